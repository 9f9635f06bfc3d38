"""How large a request body the public port forwards: the largest message a launched run's sites
send, plus a margin (server/deploy/door.py keeps the limit in force, server/deploy/proxy.py writes
it into nginx's configuration).

What a SuperNode sends through the Fleet API (Flower 1.41, REST transport, read from its source):
every call is one protobuf body with a Content-Length (httpx, never chunked). A message's
content is not in `push-messages` (metadata and the object tree only) but pushed object by object
with `push-object`: an ArrayRecord's arrays are cut into chunks of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
(5 MiB), but a ConfigRecord is one object. The ConfigRecords a site sends are small except two:
its setup statistics (one JSON of every code it holds, SETUP_STATS_BYTES at most) and, in a run with
secure aggregation, the secure round's masked vector (secure_aggregation/messages.py MaskedInput:
one field integer per parameter of the groups it holds), so

    push-object body <= max(CHUNK, SETUP_STATS_BYTES, [secure] field_bytes x n_parameters) + FRAMING
    limit            =  MARGIN x that, rounded up to a MiB

with n_parameters the run's model (its config) over REFERENCE_VOCABULARY codes with every modality:
the vocabulary is agreed only once the sites sent their statistics, after the launch. A run
without secure aggregation needs BASE_PUSH_BODY_BYTES whatever its model (81 MiB); with it, `tiny`
81 MiB, `small` 81 MiB, `paper` 1,328 MiB at the default 16-bit field (twice the vector at 32 bits).
Every other Fleet route carries a small request (node id, run id, object ids): SMALL_BODY_BYTES.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

if TYPE_CHECKING:
    from healthfm_core.model.config import ModelConfig
    from server.config import FederationConfig

REFERENCE_VOCABULARY = 32_768  # codes; a model's embedding and output rows grow with it
REFERENCE_PRS_TRAITS = 16
# A site's setup statistics (healthfm_core/data/sequences/code_stats.py SiteCodeStats as JSON):
# a diagnosis code is ~60 bytes, a numeric one with its quantile sketch (relative accuracy 1 %)
# ~1.5 KiB over a lab's usual range, ~7 KiB over five decades; 2 KiB a code on average, bounded.
SETUP_STATS_BYTES_PER_CODE = 2048
SETUP_STATS_BYTES = REFERENCE_VOCABULARY * SETUP_STATS_BYTES_PER_CODE
FRAMING = 64 * 1024  # the protobuf fields around an object: node, run id, object id
MARGIN = 1.25
MIB = 1 << 20
SMALL_BODY_BYTES = 1 * MIB  # every other Fleet route: ids and metadata, an object tree


def model_parameters(model: str | ModelConfig, vocab_size: int = REFERENCE_VOCABULARY) -> int:
    """The parameter count of a model config (or its name) over `vocab_size` codes, every modality
    (built on torch's meta device: no memory)."""
    from healthfm_core.model.config import load_model_config  # the SuperLink reads this module's sizes alone

    config = load_model_config(model) if isinstance(model, str) else model
    return _parameters(config.model_dump_json(), vocab_size)


@lru_cache(maxsize=8)  # a model build per launch otherwise; keyed by the config's JSON (it holds lists)
def _parameters(config_json: str, vocab_size: int) -> int:
    # Imported here: the SuperLink process reads this module's sizes (large_bodies.py) and loads
    # neither torch nor the data layer's pyarrow for them (41 MB more at import).
    import torch

    from healthfm_core.data.files.layout import MODALITIES
    from healthfm_core.model.config import ModelConfig
    from healthfm_core.model.healthfm import HealthFM

    with torch.device("meta"):
        net = HealthFM(ModelConfig.model_validate_json(config_json), vocab_size, REFERENCE_PRS_TRAITS, list(MODALITIES))
    return sum(t.numel() for t in net.state_dict().values())


def largest_push_bytes(secure_parameters: int = 0, field_bytes: int = 2) -> int:
    """The largest push-object body a site sends: a chunk, its setup statistics, or (a run with
    secure aggregation over `secure_parameters`) its masked vector of `field_bytes` integers."""
    return max(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, SETUP_STATS_BYTES, field_bytes * secure_parameters) + FRAMING


def push_body_limit_bytes(largest: int) -> int:
    """MARGIN x the largest push-object body, in whole MiB."""
    return math.ceil(MARGIN * largest / MIB) * MIB


# What any run needs without secure aggregation: the door's limit before a launch asks for more.
BASE_PUSH_BODY_BYTES = push_body_limit_bytes(largest_push_bytes())


def run_push_body_bytes(config: FederationConfig) -> int:
    """The push-object limit a run of `config` needs (its model, secure aggregation and field)."""
    if not config.secure_aggregation:
        return BASE_PUSH_BODY_BYTES
    return push_body_limit_bytes(largest_push_bytes(model_parameters(config.model), config.secagg_field_bits // 8))


__all__ = [
    "BASE_PUSH_BODY_BYTES",
    "MARGIN",
    "MIB",
    "REFERENCE_VOCABULARY",
    "SETUP_STATS_BYTES",
    "SMALL_BODY_BYTES",
    "largest_push_bytes",
    "model_parameters",
    "push_body_limit_bytes",
    "run_push_body_bytes",
]
