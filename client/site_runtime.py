"""A site's side of the federation, without Flower: its data, its policy, its local work.

The ClientApp (client/client_app.py) only decodes messages and calls this. Everything that
leaves the site is produced here, and only as aggregates: capabilities (modalities and subject
counts), code statistics suppressed below the site's minimum subject count, trained weights of
the groups the site holds, and held-out metrics on at least the site's minimum of subjects.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from healthfm_core.data.site import Site, open_site
from healthfm_core.data.tasks import TASKS, WearableTask, task_labels
from healthfm_core.data.tokens import LabelledDataset, PretrainingDataset, SiteSequences, make_loader
from healthfm_core.data.vocab import SiteCodeStats, site_code_stats
from healthfm_core.eval.probes import Features, compute_embeddings, evaluate_features
from healthfm_core.federation import (
    LOSS_PREFIX,
    EvalConfig,
    FederationSetup,
    RoundConfig,
    SiteCapabilities,
    groups_for_modalities,
    site_seed,
)
from healthfm_core.model.groups import group_state_dict, parameter_group
from healthfm_core.model.healthfm import HealthFM
from healthfm_core.model.objectives import LOSS_NAMES
from healthfm_core.train.trainer import TrainConfig, train_local

log = logging.getLogger("healthfm.client")

SPLITS = ("train", "tuning", "held_out")


class SiteConfig(BaseModel):
    """A site's own settings (Flower node config, kebab-case keys): where its data is and its
    policy, which holds whatever the server asks."""

    model_config = ConfigDict(extra="forbid")

    site_root: Path
    site_name: str | None = None  # default: the site root's directory name
    min_code_subjects: int = Field(default=10, ge=1)  # codes seen in fewer subjects are never named
    min_report_subjects: int = Field(default=20, ge=1)  # no metric on fewer subjects leaves the site
    device: str = "cpu"

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteConfig:
        """From a node config; keys Flower adds (partition-id, num-partitions) are ignored."""
        fields = {name.replace("_", "-"): name for name in cls.model_fields}
        data = {fields[k]: v for k, v in node_config.items() if k in fields}
        if "site_root" not in data:
            raise ValueError(
                f"node config has no 'site-root' (keys: {sorted(node_config)}); start the SuperNode with "
                "--node-config \"site-root='/path/to/site'\""
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ValueError(f"invalid node config: {err}") from None

    @property
    def name(self) -> str:
        return self.site_name or Path(self.site_root).resolve().name


@dataclass
class TrainOutcome:
    arrays: dict[str, np.ndarray]  # the trained groups' weights, as they leave the site
    metrics: dict[str, float]  # num-examples, num-examples.<group>, loss.<name>, timings


class SiteRuntime:
    """One open site: data loaded once, a model per setup, local training and evaluation."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.name = config.name
        self.site: Site = open_site(config.site_root)
        self.groups = groups_for_modalities(
            [m for m in self.site.modalities if self.site.subject_counts.get(m, 0) > 0]
        )
        self._sequences: dict[str, SiteSequences] = {}
        self._models: dict[str, tuple[HealthFM, dict[str, torch.Tensor]]] = {}
        self._labels: dict[tuple[str, ...], dict[str, pa.Table]] = {}
        self._splits: dict[str, np.ndarray] | None = None
        log.info("site %s opened: modalities %s, groups %s", self.name, self.site.modalities, self.groups)

    # ------------------------------------------------------------------ round 0

    def capabilities(self) -> SiteCapabilities:
        return SiteCapabilities(site=self.name, modalities=self.site.modalities, subjects=self.site.subject_counts)

    def code_stats(self) -> SiteCodeStats:
        return site_code_stats(self.site, min_subjects=self.config.min_code_subjects)

    def check_setup(self, setup: FederationSetup) -> None:
        """Refuse a setup this site cannot train under (its policy, not the server's word)."""
        if setup.vocabulary.min_subjects < self.config.min_code_subjects:
            log.warning(
                "site %s: federation vocabulary minimum %d subjects is below the site's %d (the site's own "
                "statistics were suppressed at %d before they left)", self.name, setup.vocabulary.min_subjects,
                self.config.min_code_subjects, self.config.min_code_subjects,
            )

    # ------------------------------------------------------------------ data

    def split_ids(self) -> dict[str, np.ndarray]:
        if self._splits is None:
            table = self.site.subject_splits()
            ids = table["subject_id"].to_numpy()
            split = np.asarray(table["split"].to_pylist())
            self._splits = {s: np.sort(ids[split == s]) for s in SPLITS}
        return self._splits

    def sequences(self, setup: FederationSetup) -> SiteSequences:
        key = setup.sha256
        if key not in self._sequences:
            self._sequences = {key: SiteSequences.from_site(self.site, setup.vocabulary)}  # one setup at a time
        return self._sequences[key]

    # ------------------------------------------------------------------ model

    def model(self, setup: FederationSetup, arrays: Mapping[str, np.ndarray]) -> HealthFM:
        """The seeded initial model with the received groups loaded. Groups the site does not
        receive keep their initial values; a key of a group the site does not hold is refused."""
        key = setup.sha256
        if key not in self._models:
            model = setup.init_model().to(self.config.device)
            init = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self._models = {key: (model, init)}
        model, init = self._models[key]
        own = set(self.groups)
        state = model.state_dict()
        for name, value in arrays.items():
            if name not in state:
                raise ValueError(f"received unknown parameter {name!r}")
            group = parameter_group(name)
            if group not in own:
                raise ValueError(f"received parameter {name!r} of group {group!r}: this site holds only {sorted(own)}")
            if tuple(value.shape) != tuple(state[name].shape):
                raise ValueError(f"received {name!r} with shape {tuple(value.shape)}, expected {tuple(state[name].shape)}")
        with torch.no_grad():
            model.load_state_dict(init)  # back to the initialisation: no state carried across rounds
            for name, value in arrays.items():
                state[name].copy_(torch.from_numpy(np.asarray(value)).to(state[name].dtype))
        return model

    # ------------------------------------------------------------------ training

    def train(self, setup: FederationSetup, arrays: Mapping[str, np.ndarray], cfg: RoundConfig) -> TrainOutcome:
        t0 = time.perf_counter()
        model = self.model(setup, arrays)
        received = sorted({parameter_group(k) for k in arrays})
        seed = site_seed(cfg.seed, cfg.round, self.name)
        dataset = PretrainingDataset(
            self.sequences(setup), self.split_ids()["train"], time_mode="random",
            max_events=cfg.max_events, max_patches=cfg.max_patches, seed=seed,
        )
        if len(dataset) == 0:
            raise ValueError(f"site {self.name}: no train-split subject has a timed observation")
        loader = make_loader(dataset, batch_size=cfg.batch_size, shuffle=True, seed=seed)
        train_cfg = TrainConfig(
            steps=cfg.local_steps, lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
            seed=seed, progress=False, log_every=cfg.local_steps,
        )
        result = train_local(model, loader, train_cfg, groups=received, weights_fn=cfg.weights)
        # A group none of this round's samples carried did not train: it is not sent back.
        trained = [g for g in received if result.examples_per_group.get(g, 0) > 0]
        out_dtype = np.float16 if cfg.fp16_transport else None
        out = {}
        for name, value in group_state_dict(result.group_state, trained).items():
            array = value.numpy()
            if out_dtype is not None and np.issubdtype(array.dtype, np.floating):
                array = array.astype(out_dtype)
            out[name] = array
        metrics: dict[str, float] = {"num-examples": int(result.examples)}
        for g in trained:
            metrics[f"num-examples.{g}"] = int(result.examples_per_group[g])
        for loss in (*LOSS_NAMES, "total"):
            values = [h[loss] for h in result.history if loss in h]
            # An objective with no data here (e.g. alignment at a site without wearables) is 0 at
            # every step: leave it out rather than pull the federation's average towards 0.
            if values and (loss == "total" or any(v != 0.0 for v in values)):
                metrics[LOSS_PREFIX + loss] = float(np.mean(values))
        last = result.history[-1] if result.history else {}
        for key in ("rate_min", "rate_max", "grad_norm"):
            if key in last:
                metrics[key.replace("_", "-")] = float(last[key])
        metrics["train-seconds"] = float(result.seconds)
        metrics["client-seconds"] = time.perf_counter() - t0
        log.info("site %s round %d: %d steps, %d samples, loss %.4f, groups %s", self.name, cfg.round,
                 cfg.local_steps, result.examples, metrics.get(LOSS_PREFIX + "total", float("nan")), trained)
        return TrainOutcome(out, metrics)

    # ------------------------------------------------------------------ evaluation

    def labels(self, tasks: tuple[str, ...], seed: int) -> dict[str, pa.Table]:
        key = (*tasks, str(seed))
        if key not in self._labels:
            unknown = [t for t in tasks if t not in TASKS]
            if unknown:
                raise ValueError(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
            wanted = [t for t in tasks if not (isinstance(TASKS[t], WearableTask) and "wearables" not in self.groups)]
            self._labels = {key: task_labels(self.site, wanted, seed=seed) if wanted else {}}
        return self._labels[key]

    def evaluate(self, setup: FederationSetup, arrays: Mapping[str, np.ndarray], cfg: EvalConfig) -> dict[str, float]:
        """Frozen probes on the site's own splits (fit on train, C or alpha from tuning, scored on
        held_out). Metrics of a task whose split has fewer subjects than the site's minimum, or a
        single class, are withheld (counted in `withheld`)."""
        t0 = time.perf_counter()
        model = self.model(setup, arrays)
        labels = self.labels(tuple(cfg.tasks), cfg.seed)
        if not labels:
            return {"num-examples": 0, "tasks": 0, "withheld": 0, "eval-seconds": time.perf_counter() - t0}
        # Every task's samples embedded once: tasks share most (subject, prediction_time) pairs.
        union = pa.concat_tables([t.select(["subject_id", "prediction_time"]) for t in labels.values()])
        union = union.group_by(["subject_id", "prediction_time"]).aggregate([])
        union = union.sort_by([("subject_id", "ascending"), ("prediction_time", "ascending")])
        keys = {k: i for i, k in enumerate(_pair_keys(union))}
        probe_rows = union.append_column("boolean_value", pa.array(np.zeros(union.num_rows, dtype=bool)))
        loader = make_loader(
            LabelledDataset(self.sequences(setup), probe_rows, max_events=cfg.max_events, max_patches=cfg.max_patches),
            batch_size=cfg.batch_size, shuffle=False,
        )
        emb = compute_embeddings(model, loader)
        split_of = self._split_lookup()
        metrics: dict[str, float] = {}
        withheld = 0
        for task, table in labels.items():
            idx = np.array([keys[k] for k in _pair_keys(table)], dtype=np.int64)
            split = split_of(table["subject_id"].to_numpy())
            value_col = "float_value" if "float_value" in table.column_names else "boolean_value"
            y = table[value_col].to_numpy(zero_copy_only=False).astype(np.float64)
            subj = table["subject_id"].to_numpy()
            parts: dict[str, Features] = {}
            reason = None
            for s in SPLITS:
                sel = split == s
                n_subj = len(np.unique(subj[sel]))
                if n_subj < self.config.min_report_subjects:
                    reason = f"{s} split has {n_subj} subjects < minimum {self.config.min_report_subjects}"
                    break
                ys = y[sel]
                if value_col == "boolean_value" and s != "tuning" and (ys.all() or not ys.any()):
                    reason = f"{s} split has a single class"
                    break
                parts[s] = Features(subj[sel], emb.prediction_time[idx[sel]], emb.x[idx[sel]], ys)
            if reason is not None:
                withheld += 1
                log.info("site %s: %s withheld (%s)", self.name, task, reason)
                continue
            spec = TASKS[task]
            horizon = int(spec.horizon_days) if hasattr(spec, "horizon_days") else None
            row, _ = evaluate_features("federated", task, horizon, parts, regression=isinstance(spec, WearableTask),
                                       n_boot=cfg.n_boot, seed=cfg.seed)
            if isinstance(spec, WearableTask):
                metrics[f"{task}.r2"] = float(row.r2)
            else:
                metrics.update({f"{task}.auroc": float(row.auroc), f"{task}.auprc": float(row.auprc),
                                f"{task}.ece": float(row.ece)})
            metrics[f"{task}.n"] = int(row.n)
        metrics.update({"num-examples": int(len(emb)), "tasks": len(labels) - withheld, "withheld": withheld,
                        "eval-seconds": time.perf_counter() - t0})
        return metrics

    def _split_lookup(self):
        ids = self.split_ids()
        all_ids = np.concatenate([ids[s] for s in SPLITS])
        names = np.concatenate([np.full(len(ids[s]), s, dtype=object) for s in SPLITS])
        order = np.argsort(all_ids)
        all_ids, names = all_ids[order], names[order]

        def lookup(subjects: np.ndarray) -> np.ndarray:
            pos = np.clip(np.searchsorted(all_ids, subjects), 0, max(len(all_ids) - 1, 0))
            found = all_ids[pos] == subjects if len(all_ids) else np.zeros(len(subjects), dtype=bool)
            return np.where(found, names[pos], "none")

        return lookup


def _pair_keys(table: pa.Table) -> list[tuple[int, int]]:
    """(subject_id, prediction_time in microseconds) per row."""
    pt = pc.cast(table["prediction_time"], pa.int64()).to_numpy()
    return list(zip(table["subject_id"].to_numpy().tolist(), pt.tolist()))


# One runtime per site root and process: a simulation's worker process serves several sites,
# a deployed SuperNode one; data is loaded once, not per message.
_RUNTIMES: dict[tuple[str, str], SiteRuntime] = {}
_LOCK = threading.Lock()


def get_runtime(config: SiteConfig) -> SiteRuntime:
    key = (str(Path(config.site_root).resolve()), config.model_dump_json())
    with _LOCK:
        if key not in _RUNTIMES:
            _RUNTIMES[key] = SiteRuntime(config)
        return _RUNTIMES[key]
