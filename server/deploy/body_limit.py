"""How large a request body the public port accepts: the largest message a site legitimately
sends, plus a margin (server/deploy/proxy.py writes it into nginx.conf).

What a SuperNode sends through the Fleet API (Flower 1.41, REST transport, read from its source):
every call is one protobuf body with a Content-Length (httpx, never chunked). A message's
content is not in `push-messages` (metadata and the object tree only) but pushed object by object
with `push-object`: an ArrayRecord's arrays are cut into chunks of FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
(5 MiB), but a ConfigRecord is one object. The largest object a site sends is the secure round's
masked vector (secure_aggregation/messages.py MaskedInput: one field integer per parameter of the
groups it holds, in a ConfigRecord), so

    push-object body <= max(CHUNK, field_bytes x n_parameters) + FRAMING
    limit            =  MARGIN x that, rounded up to a MiB

with n_parameters the `paper` model's (configs/model/paper.yaml, the largest this repository
ships) over a vocabulary of REFERENCE_VOCABULARY codes with every modality, and field_bytes
the secure round's default field (16 bits; secagg-field-bits=32 on a model that size needs twice
the limit: `superlink --max-body-mib`). Every other Fleet route carries a small request (node id,
run id, object ids): SMALL_BODY_BYTES.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE

from healthfm_core.data.files.layout import MODALITIES
from healthfm_core.model.config import load_model_config
from healthfm_core.model.healthfm import HealthFM

REFERENCE_MODEL = "paper"
REFERENCE_VOCABULARY = 32_768  # codes; a model's embedding and output rows grow with it
REFERENCE_PRS_TRAITS = 16
FIELD_BYTES = 2  # the secure round's default field, 16 bits (server/config.py secagg_field_bits)
FRAMING = 64 * 1024  # the protobuf fields around an object: node, run id, object id
MARGIN = 1.25
MIB = 1 << 20
SMALL_BODY_BYTES = 1 * MIB  # every other Fleet route: ids and metadata, an object tree


@lru_cache(maxsize=8)  # a model build per nginx (re)start otherwise
def model_parameters(model: str = REFERENCE_MODEL, vocab_size: int = REFERENCE_VOCABULARY) -> int:
    """The parameter count of a model config over `vocab_size` codes, every modality (built on
    torch's meta device: no memory)."""
    with torch.device("meta"):
        net = HealthFM(load_model_config(model), vocab_size, REFERENCE_PRS_TRAITS, list(MODALITIES))
    return sum(t.numel() for t in net.state_dict().values())


def largest_push_bytes(n_parameters: int, field_bytes: int = FIELD_BYTES) -> int:
    """The largest push-object body a site sends for a model of `n_parameters`."""
    return max(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, field_bytes * n_parameters) + FRAMING


def push_body_limit_bytes(n_parameters: int | None = None) -> int:
    """MARGIN x the largest push-object body, in whole MiB (default: the reference model's)."""
    n = model_parameters() if n_parameters is None else n_parameters
    return math.ceil(MARGIN * largest_push_bytes(n) / MIB) * MIB


__all__ = [
    "FIELD_BYTES",
    "MARGIN",
    "REFERENCE_MODEL",
    "REFERENCE_VOCABULARY",
    "SMALL_BODY_BYTES",
    "largest_push_bytes",
    "model_parameters",
    "push_body_limit_bytes",
]
