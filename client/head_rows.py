"""A site's rows for the federated task head (client/head_app.py): each asked task key's train
and tuning embeddings and labels, or the reason the site takes no part. Nothing here leaves the
site; the ClientApp sends only the aggregates of healthfm_core/eval/head_site.py.

The rows are the evaluation's (client/model_use.py: the release's evaluation settings, its
subject sample, its path through the model), embedded with the release once per process and
kept (`load_head_rows` caches by node config and tasks), or read from the site's own
`client.py embed` file (node config `embeddings`). A key whose train or tuning split falls below
the site's minimums (min_report_subjects subjects, min_report_positives positive and negative
train rows; each raised by its policy) gives a reason, never rows.

Node config keys beside the site's (client/site_runtime.SiteConfig): `model`, the release folder
the site holds; `release-key`, the federation's public release key from the site's startup files
(release_signing.pem: the release's signature is verified against it), or `trust-unsigned-release`
true for a release the site loads unverified (a local simulation's); `embeddings` (optional), its embed file of the tasks' rows; `max-subjects`
(optional), the subject budget per split of its rows (the release's own sample when absent). The site's `policy`
(its DP budget, and its expected_release: a release of another run is refused,
healthfm_core/release_binding.py) and `state-dir` (its durable privacy ledger) are the pretraining's own, so the
head's DP rounds (healthfm_core/privacy/head.py) spend from the same ledger under the same cap.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, TypeAdapter, ValidationError

from client.model_use import NoRows, embed_rows_at_site, eval_config, splits_of, task_rows
from client.release_fields import task_candidates
from client.release_gate import Candidates, ReleaseGate
from client.site_runtime import SiteConfig, SiteRuntime, get_runtime
from healthfm_core.data.checks.report_floor import class_subjects
from healthfm_core.eval.head_site import SiteSplits
from healthfm_core.eval.site_eval import task_split_counts
from healthfm_core.privacy.ledger import PrivacyLedger
from healthfm_core.privacy.policy import DPPolicy
from healthfm_core.protocol import EvalConfig, TaskReason
from healthfm_core.release import ModelRelease, load_release
from healthfm_core.release_binding import ExpectedRun
from healthfm_core.release_fit import DEFAULT_MAX_UNKNOWN_SHARE, require_fit

log = logging.getLogger("healthfm.client")


@dataclass
class HeadRows:
    """One site's rows of the asked tasks: per label key its splits, or why it takes no part."""

    site: str
    setup_sha256: str
    max_events: int
    max_patches: int
    keys: dict[str, SiteSplits | TaskReason | str] = field(default_factory=dict)
    # The site's DP budget (its policy's `dp:`) and its durable privacy ledger (node config
    # `state-dir`), the pretraining's own (client/site_runtime.SiteRuntime): the head's DP rounds
    # spend from the same ledger under the same cap. None: no budget / no state directory.
    dp_policy: DPPolicy | None = None
    ledger: PrivacyLedger | None = None
    # The policy's require_secure_aggregation: a head run's statistics and head leave in the clear,
    # so such a site answers every stage with a refusal (client/head_app.py).
    require_secure_aggregation: bool = False
    # The site's release gate of its evaluation figures (client/release_gate.py) and each key's
    # train and tuning fields, the evaluation's own (client/release_fields.py): a stage whose
    # key's rows differ from what the site released before by too few subjects is refused.
    # None (rows a test builds): no gate.
    gate: ReleaseGate | None = None
    fields: dict[str, Candidates] = field(default_factory=dict)


def head_splits(
    labels: pa.Table, x: np.ndarray, split: np.ndarray, min_subjects: int, min_positives: int
) -> SiteSplits | str:
    """A key's train and tuning rows (x: each label row's embedding; split: each row's split), or
    why the site takes no part. What would leave is the train rows' count, positives and sums and
    the tuning rows' log-loss: each split behind them needs `min_subjects` subjects, and the train
    split `min_positives` subjects with a positive row and as many with a negative row (the
    held-out split is not used). The reason names no count."""
    counts = task_split_counts(labels, lambda sids: split)
    for name in ("train", "tuning"):
        if counts[name].subjects < min_subjects:
            return f"fewer than {min_subjects} subjects (min_report_subjects) in {name}"
    y = labels["boolean_value"].to_numpy(zero_copy_only=False).astype(bool)
    is_train, is_tune = split == "train", split == "tuning"
    sids = labels["subject_id"].to_numpy()
    # Subjects, not rows: a subject's several train rows are one positive (or negative).
    if min(class_subjects(y[is_train], sids[is_train])) < min_positives:
        return f"fewer than {min_positives} train subjects with a positive or a negative row (min_report_positives)"
    return SiteSplits(x[is_train], y[is_train], x[is_tune], y[is_tune], train_subjects=sids[is_train])


HEAD_SPLITS = ("train", "tuning")  # what the head's figures read (never held_out)
_LOCK = threading.Lock()
_RELEASES: dict[str, ModelRelease] = {}
_ROWS: dict[tuple[str, tuple[str, ...]], HeadRows] = {}


def _release(path: str, key: str | None, trust_unsigned: bool, expect: ExpectedRun | None) -> ModelRelease:
    """The release (once per process), refused when it is not the run the site's policy expects."""
    cache_key = json.dumps([path, key, trust_unsigned, expect.model_dump() if expect else None])
    if cache_key not in _RELEASES:
        _RELEASES[cache_key] = load_release(
            path, trusted_keys=[key] if key else [], trust_unsigned=trust_unsigned, expect=[expect] if expect else []
        )
        if expect is None:
            log.warning(
                "release %s is %s; this site's policy names no expected_release, so any release the federation "
                "signed would load",
                path,
                _RELEASES[cache_key].describe_run(),
            )
    return _RELEASES[cache_key]


def embedded_task_rows(
    runtime: SiteRuntime, release: ModelRelease, cfg: EvalConfig, embeddings: str | Path | None
) -> tuple[pa.Table, np.ndarray]:
    """The tasks' rows (subject_id, prediction_time) and their embeddings: the site's
    `client.py embed` file when given, else embedded here with the release."""
    if embeddings:
        table = pq.read_table(str(embeddings))
        x = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float64)
        return table.select(["subject_id", "prediction_time"]), x
    rows = task_rows(runtime, cfg)
    return rows, embed_rows_at_site(runtime, release, rows, cfg.max_events, cfg.max_patches, cfg.batch_size).x


def label_row_index(rows: pa.Table, labels: pa.Table, site: str) -> np.ndarray:
    """For each label row, its row in `rows` (same subject and prediction time)."""
    pt = pc.cast(rows["prediction_time"], pa.int64()).to_numpy()
    index = {k: i for i, k in enumerate(zip(rows["subject_id"].to_numpy().tolist(), pt.tolist(), strict=True))}
    tpt = pc.cast(labels["prediction_time"], pa.int64()).to_numpy()
    try:
        keys = zip(labels["subject_id"].to_numpy().tolist(), tpt.tolist(), strict=True)
        return np.array([index[k] for k in keys], dtype=np.int64)
    except KeyError as err:
        raise ValueError(f"site {site}: the embeddings lack the labelled row {err}") from None


_MAX_SUBJECTS = TypeAdapter(Annotated[int, Field(ge=0, strict=True)] | None)


def max_subjects_of(config: Mapping[str, Any]) -> int | None:
    """Node config `max-subjects`: the evaluation's subject budget per split for the head's rows
    (0: every subject; absent: the release's own sample)."""
    value = config.get("max-subjects")
    try:
        return _MAX_SUBJECTS.validate_python(value)
    except ValidationError:
        raise ValueError(f"node config field max-subjects: value {value!r} is not a whole number >= 0") from None


def add_keys(
    out: HeadRows, runtime: SiteRuntime, labels: Mapping[str, pa.Table | TaskReason], rows: pa.Table, x_all: np.ndarray
) -> None:
    """Each binary key's splits (or why the site takes no part) from its labels and the embedded
    `rows` (x_all: their embeddings), and its train and tuning fields for the release gate."""
    split_of = partial(splits_of, runtime)
    for key, table in labels.items():
        if isinstance(table, TaskReason):
            out.keys[key] = table
            continue
        if "boolean_value" not in table.column_names:
            continue  # a numeric task: the federated head is logistic
        sids = table["subject_id"].to_numpy()
        idx = label_row_index(rows, table, runtime.name)
        out.keys[key] = head_splits(
            table, x_all[idx], split_of(sids), runtime.min_report_subjects, runtime.min_report_positives
        )
        out.fields[key] = task_candidates(
            {key: table}, split_of, runtime.contributions(), runtime.min_report_subjects, splits=HEAD_SPLITS
        )


def load_head_rows(config: Mapping[str, Any], tasks: Sequence[str]) -> HeadRows:
    """The site's rows of `tasks` under its node config (cached for the process)."""
    cache_key = (json.dumps(dict(config), sort_keys=True, default=str), tuple(tasks))
    with _LOCK:
        if cache_key in _ROWS:
            return _ROWS[cache_key]
        if not config.get("model"):
            raise ValueError("node config has no 'model' (the release folder this site holds)")
        site_config = SiteConfig.from_node_config(config)
        trust_unsigned = config.get("trust-unsigned-release", False)
        if not isinstance(trust_unsigned, bool):
            raise ValueError(f"node config field trust-unsigned-release: value {trust_unsigned!r} is not true or false")
        key = config.get("release-key")
        runtime = get_runtime(site_config)  # its policy names the run the release must be
        expect = runtime.policy.expected_release if runtime.policy is not None else None
        release = _release(str(config["model"]), str(key) if key else None, trust_unsigned, expect)
        require_fit(runtime.site, release.setup, DEFAULT_MAX_UNKNOWN_SHARE, where=f"site {site_config.site_root}")
        cfg = eval_config(release, list(tasks) or None, max_subjects_of(config))
        labels = runtime.labels(cfg)
        out = HeadRows(runtime.name, release.setup.sha256, cfg.max_events, cfg.max_patches)
        out.dp_policy = runtime.policy.dp if runtime.policy is not None else None
        out.ledger = runtime.ledger
        out.require_secure_aggregation = runtime.policy is not None and runtime.policy.require_secure_aggregation
        out.gate = runtime.gate("evaluation")
        try:
            rows, x_all = embedded_task_rows(runtime, release, cfg, config.get("embeddings"))
        except NoRows:  # no labels for any asked task: every key is then refused
            _ROWS[cache_key] = out
            return out
        add_keys(out, runtime, labels, rows, x_all)
        log.info(
            "site %s: head rows of %s: %s",
            runtime.name,
            list(tasks),
            {k: "ok" if isinstance(v, SiteSplits) else getattr(v, "kind", v) for k, v in out.keys.items()},
        )
        _ROWS[cache_key] = out
        return out


__all__ = [
    "HeadRows",
    "add_keys",
    "embedded_task_rows",
    "head_splits",
    "label_row_index",
    "load_head_rows",
    "max_subjects_of",
]
