"""The wire protocol: what the server and the sites agree on, one module per message.

client/ and server/ never import each other (docs/architecture.md), so the schema of every message they
exchange lives here, as pydantic models with a flat form for Flower's records (this package
does not import flwr: records are plain mappings here). It depends on nothing above it in
healthfm_core: not the torch model (model/healthfm.py builds it from a setup, `init_model`), not
eval/ (which reads these messages), not train/.

  wire.py           message types, record names, the strict base models
  capabilities.py   query.capabilities (SiteCapabilities) and the groups of a site's modalities
  setup.py          query.setup (FederationSetup) and the modalities the model holds
  round_config.py   train's config (RoundConfig) and a site's seed in a round
  train_reply.py    train's reply (TrainReply), the round's losses
  privacy_spend.py  a DP site's spend as a train reply carries it (PrivacySpend)
  eval_config.py    evaluate's config (EvalConfig) and the score histograms' grid
  eval_reply.py     evaluate's reply (EvalReply, TaskMetrics, ScoreHistogram) and the summaries over sites
  site_share.py     one site's share of a figure pooled across sites, capped (imported as
                    healthfm_core.protocol.site_share)
  task_reason.py    why a task has no number (TaskReason, SplitCount), small cells suppressed
  transport.py      the uplink's array encoding (fp32, fp16, int8)
  packing.py        every message's arrays as a few safetensors blobs
  head.py           the federated task head's four stages (imported as healthfm_core.protocol.head)
  secure_records.py the secure rounds' message types and flat ConfigRecord form (imported as
                    healthfm_core.protocol.secure_records; the messages' models: secure_aggregation/)

The names below are the package's; import them from it (`from healthfm_core.protocol import
TrainReply`).

Exchange (one run):
  query.capabilities  server -> site: nothing;  site -> server: SiteCapabilities (no rows)
  query.code_stats    server -> site: nothing;  site -> server: SiteCodeStats JSON (suppressed
                      below the site's own minimum subject count, aggregate only)
  query.setup         server -> site: FederationSetup JSON (vocabulary, model config, init seed, the
                      modalities the model holds: the union of the sites'; the tokenisation:
                      token_window_days, max_codes_per_token);
                      the site keeps it for the run and acknowledges its sha256
  train               server -> site: its groups' arrays + RoundConfig; site -> server: a
                      TrainReply (the groups it trained, counts per group, losses, the site's
                      cumulative DP spend), or - when the site's policy refuses the request - a
                      refused TrainReply (reason, DP spend, no arrays)
  evaluate            server -> site: its groups' arrays + EvalConfig; site -> server: an EvalReply
                      (held-out metrics per task, those on fewer subjects than the site's minimum
                      withheld)

A reply's records (RecordDict keys ARRAYS_RECORD, METRICS_RECORD, STATUS_RECORD) are written by
TrainReply/EvalReply.to_records and read back by from_records; the metric keys of the wire form
are spelled in this package only. The arrays' own encoding on the uplink (RoundConfig.transport:
fp32, fp16, or int8 with the MetricRecord SCALES_RECORD of per-tensor scales) is
protocol/transport.py's: the site encodes a TrainReply's arrays last, the server decodes them
before TrainReply.from_records. Below that, every message's arrays travel packed into a few
safetensors blobs (protocol/packing.py), not one Flower Array per key.
"""

from healthfm_core.data.checks.report_floor import MIN_POSITIVES_KEY, MIN_SUBJECTS_KEY, SMALL_CELL_RISK
from healthfm_core.protocol.capabilities import MODALITY_GROUP, SiteCapabilities, groups_for_modalities
from healthfm_core.protocol.eval_config import DEFAULT_SCORE_BINS, MAX_SCORE_BINS, SCORE_SCALES, EvalConfig, ScoreScale
from healthfm_core.protocol.eval_reply import (
    EVAL_METRICS,
    MEDS_TAB_METRICS,
    TASK_KEY,
    WITHHELD_KINDS,
    EvalReply,
    ScoreHistogram,
    TaskMetrics,
    WithheldKind,
    aggregate_site_metrics,
    largest_row_share,
    median_site_metrics,
    site_metric_values,
    task_weights,
)
from healthfm_core.protocol.privacy_spend import PrivacySpend
from healthfm_core.protocol.round_config import WEIGHT_PREFIX, RoundConfig, site_seed
from healthfm_core.protocol.setup import FederationSetup, federation_modalities
from healthfm_core.protocol.task_reason import REASON_KINDS, SMALL_CELL, SPLIT_COUNTS, SplitCount, TaskReason
from healthfm_core.protocol.train_reply import TRAIN_LOSSES, TrainRecords, TrainReply, mean_losses, round_metrics
from healthfm_core.protocol.transport import SCALES_RECORD
from healthfm_core.protocol.wire import (
    ARRAYS_RECORD,
    CAPABILITIES,
    CAPABILITIES_RECORD,
    CODE_STATS,
    CODE_STATS_RECORD,
    CONFIG_RECORD,
    JSON_FIELD,
    METRICS_RECORD,
    SETUP,
    SETUP_NEEDED_RECORD,
    SETUP_RECORD,
    SHA256_FIELD,
    STATUS_RECORD,
    STATUS_REFUSED,
)

__all__ = [
    "ARRAYS_RECORD",
    "CAPABILITIES",
    "CAPABILITIES_RECORD",
    "CODE_STATS",
    "CODE_STATS_RECORD",
    "CONFIG_RECORD",
    "DEFAULT_SCORE_BINS",
    "EVAL_METRICS",
    "JSON_FIELD",
    "MAX_SCORE_BINS",
    "MEDS_TAB_METRICS",
    "METRICS_RECORD",
    "MIN_POSITIVES_KEY",
    "MIN_SUBJECTS_KEY",
    "MODALITY_GROUP",
    "REASON_KINDS",
    "SCALES_RECORD",
    "SCORE_SCALES",
    "SETUP",
    "SETUP_NEEDED_RECORD",
    "SETUP_RECORD",
    "SHA256_FIELD",
    "SMALL_CELL",
    "SMALL_CELL_RISK",
    "SPLIT_COUNTS",
    "STATUS_RECORD",
    "STATUS_REFUSED",
    "TASK_KEY",
    "TRAIN_LOSSES",
    "WEIGHT_PREFIX",
    "WITHHELD_KINDS",
    "EvalConfig",
    "EvalReply",
    "FederationSetup",
    "PrivacySpend",
    "RoundConfig",
    "ScoreHistogram",
    "ScoreScale",
    "SiteCapabilities",
    "SplitCount",
    "TaskMetrics",
    "TaskReason",
    "TrainRecords",
    "TrainReply",
    "WithheldKind",
    "aggregate_site_metrics",
    "federation_modalities",
    "groups_for_modalities",
    "largest_row_share",
    "mean_losses",
    "median_site_metrics",
    "round_metrics",
    "site_metric_values",
    "task_weights",
    "site_seed",
]
