"""Validating one site's data (a MEDS root plus the wearables sidecar): `client.py check`.

`check_site` validates a site root (healthfm_core.data.files.layout) in bounded memory (one record
batch at a time, keeping only per-subject aggregates) and never raises on bad data: every
problem becomes a `SiteProblem` naming file, column, row (0-based, within the file) or subject,
and the offending value. healthfm_core.data.sites.site opens a site that passes for reading.

Conformance with MEDS uses the `meds` package's own schemas (DataSchema, CodeMetadataSchema,
SubjectSplitSchema, DatasetMetadataSchema), read as MEDS's own `align` reads them: a column whose
type casts losslessly to the schema's (large_string code, float64 numeric_value, timestamp[ns],
...; healthfm_core.data.files.meds_align) is accepted and read cast. The project's checks come on top:
subjects contiguous and their timed rows time-sorted within a shard (static rows, null time, may
sit anywhere within the subject: MEDS does not place them; the reader sorts them first), each
subject in one shard only, codes non-empty and listed in codes.parquet, values finite, wearable
epochs on the 30-second grid with plausible ranges, splits covering exactly the subjects, and the
site's own task labels (SITE_ROOT/tasks/<task>/, healthfm_core.data.labels.site_labels) valid.

A number column of the data that is not numeric_value (a float column, or an integer one named
like `value`, `valuenum`, `result`) is read by nothing: a warning says how many values that
leaves unread, unless dataset.json declares the column (code modifier, raw source id, ...).

Files are untrusted input, opened as every reader opens them: a link out of the site root is
an error naming link and target (healthfm_core.data.files.site_paths), a parquet footer whose row counts
or column chunk sizes its file cannot hold is refused before anything is read, and one that
claims other rows than its pages hold is refused after the streaming pass counted them
(healthfm_core.data.files.parquet_guard); text that is not UTF-8 is an error naming file, column and row.

Problem counts are true counts: repeated problems of one kind in one file are cut to
MAX_PROBLEMS_PER_KIND lines plus one "and N more" line whose `count` is N.

Policy on codes missing from codes.parquet: MEDS allows incomplete code metadata (the
meds-testing-helpers samples have unlisted codes), so an unlisted code is a warning by
default and an error with `strict=True`; so are a missing codes.parquet or dataset.json.

Modalities: `wearables` when wearables/ holds rows, `genomics` when any `PRS//` code exists,
`ehr` when any other code exists, not counting MEDS_BIRTH / MEDS_DEATH: a genomics cohort
that records only birth dates beside its scores has nothing for the EHR encoder to learn from.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from healthfm_core.data.checks.aggregates import SiteAggregates
from healthfm_core.data.checks.event_checks import check_event_shard, check_subject_shards
from healthfm_core.data.checks.file_checks import report_outside_root
from healthfm_core.data.checks.metadata_checks import (
    check_dataset_metadata,
    check_own_labels,
    check_splits,
    read_code_metadata,
)
from healthfm_core.data.checks.problem_log import (
    LABEL_ERROR_KINDS,
    ProblemLog,
    SiteReport,
    SiteSummary,
    time_str,
    to_datetime,
)
from healthfm_core.data.checks.wearable_checks import check_wearables_file
from healthfm_core.data.files.layout import (
    DATA_SUBDIRECTORY,
    EPOCH_SECONDS,
    MODALITIES,
    WEARABLES_SUBDIRECTORY,
    hash_splits,
)
from healthfm_core.data.files.site_paths import list_files
from healthfm_core.data.labels.site_labels import site_tasks

logger = logging.getLogger(__name__)


def _total_rows(paths: Iterable[Path]) -> int:
    total = 0
    for p in paths:
        try:
            total += pq.ParquetFile(p).metadata.num_rows
        except Exception:
            pass  # reported as unreadable by the check itself
    return total


@dataclass(frozen=True)
class CheckedSubjects:
    """The subjects a check found: what healthfm_core.data.sites.site needs to open the site."""

    subject_ids: np.ndarray  # sorted unique subjects with rows in data/
    per_modality: dict[str, np.ndarray]  # modality -> sorted subject ids


def run_check(root: str | Path, progress: bool = False, strict: bool = False) -> tuple[SiteReport, CheckedSubjects]:
    """`check_site`, also returning the subjects it found (one pass over the data for both)."""
    root = Path(root)
    log = ProblemLog(root, strict)
    agg = SiteAggregates()
    report_root = str(root)
    if not root.is_dir():
        log.add("no_site_root", ".", f"site root {root} does not exist or is not a directory", value=str(root))
        report = SiteReport(root=report_root, problems=log.finish(), summary=None, ok=False, strict=strict)
        return report, CheckedSubjects(agg.subjects(), agg.modality_subjects())

    data_files, data_escapes = list_files(root, DATA_SUBDIRECTORY, ".parquet")
    wear_files, wear_escapes = list_files(root, WEARABLES_SUBDIRECTORY, ".parquet")
    for escape in data_escapes + wear_escapes:
        report_outside_root(log, escape)
    agg.subjects_incomplete = bool(data_escapes)
    declared = check_dataset_metadata(log)
    listed_codes = read_code_metadata(log)

    with tqdm(
        total=_total_rows(data_files + wear_files),
        unit="rows",
        desc=f"checking {root.name}",
        disable=not progress,
        leave=False,
    ) as bar:
        for path in data_files:
            check_event_shard(log, path, agg, listed_codes, bar, declared)
        for path in wear_files:
            check_wearables_file(log, path, agg, bar)

    if not data_files and not data_escapes:
        log.add(
            "empty_data", DATA_SUBDIRECTORY, f"no MEDS data shards: {DATA_SUBDIRECTORY}/**/*.parquet matched nothing"
        )
    elif agg.n_events == 0 and not log.has_errors:
        log.add("empty_data", DATA_SUBDIRECTORY, "the MEDS data shards hold no rows", value="0 rows")
    check_subject_shards(log, agg)

    subjects = agg.subjects()
    for file, wear in agg.wear_subjects if not agg.subjects_incomplete else []:
        for s in np.setdiff1d(wear, subjects):
            log.add(
                "wearables_unknown_subject",
                file,
                "subject has wearables but no rows in data/; its wearables are ignored",
                column="subject_id",
                subject_id=s,
                value=str(s),
                severity="warning",
            )

    splits = check_splits(log, subjects, complete=not agg.subjects_incomplete)
    own_tasks = site_tasks(root)
    data_sound = not log.has_errors
    if data_sound:  # labels are checked against the data: only once the data is sound
        for task in own_tasks:
            check_own_labels(log, task)
    splits_from_file = splits is not None
    if splits is None:
        names, sizes = np.unique(
            np.asarray(hash_splits(subjects).column("split").to_pylist(), dtype=object), return_counts=True
        )
        splits = {str(k): int(v) for k, v in zip(names, sizes)}

    summary = None
    time_min = to_datetime(agg.time_min) if agg.time_min is not None else None
    time_max = to_datetime(agg.time_max) if agg.time_max is not None else None
    if (agg.time_min is not None and time_min is None) or (agg.time_max is not None and time_max is None):
        log.add(
            "time_out_of_python_range",
            DATA_SUBDIRECTORY,
            "times outside years 1..9999 cannot be shown as dates",
            value=f"{time_str(agg.time_min)} .. {time_str(agg.time_max)}",
            severity="warning",
        )
    per_modality = agg.modality_subjects()
    # Bad label files of a task (its own tasks/<task>/) make the check fail but not the data's
    # numbers: the summary stands, and open_site opens the site without those tasks' labels.
    if data_sound and not any(p.severity == "error" and p.kind not in LABEL_ERROR_KINDS for p in log.problems):
        counts = {m: int(per_modality[m].size) for m in MODALITIES}
        summary = SiteSummary(
            n_subjects=int(subjects.size),
            n_events=agg.n_events,
            n_codes=len(agg.codes_seen),
            time_min=time_min,
            time_max=time_max,
            modalities=[m for m in MODALITIES if counts[m] > 0],
            subjects_per_modality=counts,
            wearable_days=agg.n_wear_epochs * EPOCH_SECONDS / 86400.0,
            prs_traits=sorted(agg.prs_traits),
            splits=splits,
            splits_from_file=splits_from_file,
            n_wearable_epochs=agg.n_wear_epochs,
            site_tasks=own_tasks,
        )
    problems = log.finish()
    ok = not any(p.severity == "error" for p in problems)
    report = SiteReport(root=report_root, problems=problems, summary=summary, ok=ok, strict=strict)
    return report, CheckedSubjects(subjects, per_modality)


def check_site(root: str | Path, progress: bool = False, strict: bool = False) -> SiteReport:
    """Validate a site root; never raises on bad data (problems go into the report)."""
    report, _ = run_check(root, progress, strict)
    for p in report.problems:
        logger.debug("%s", p)
    return report


__all__ = ["CheckedSubjects", "check_site", "run_check"]
