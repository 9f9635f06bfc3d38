"""train: the round's config the server sends each site (ConfigRecord CONFIG_RECORD), and the seed
of a site's local work in a round."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field, StrictBool

from healthfm_core.protocol.flat import from_flat, to_flat
from healthfm_core.protocol.transport import Rounding, Transport
from healthfm_core.protocol.wire import StrictMessage
from healthfm_core.terms.objective_weights import ObjectiveWeights

# What the server adds beside a RoundConfig in each site's train message's ConfigRecord (Flower
# FedAvg's round key, and the groups the message carries): server/round.py train_messages.
SERVER_ROUND_KEY = "server-round"
GROUPS_KEY = "groups"
STRATEGY_KEYS = (SERVER_ROUND_KEY, GROUPS_KEY)


def site_seed(seed: int, round: int, site: str) -> int:
    """Seed of one site's local work in one round: differs by round and site, never by process
    (a site's name, not its node id, which changes when a run is resumed)."""
    digest = zlib.crc32(site.encode("utf-8"))
    return int(np.random.SeedSequence([seed, round, digest]).generate_state(1, dtype=np.uint64)[0] >> 1)


class RoundConfig(StrictMessage):
    """The train message's config (ConfigRecord) of one round, to one site."""

    round: int = Field(ge=1)
    rounds: int = Field(ge=1)
    local_steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    batch_size: int = Field(default=16, gt=0)
    max_events: int = Field(default=256, gt=0)
    max_patches: int = Field(default=32, gt=0)
    seed: int = 0
    # How the site's reply carries its arrays (healthfm_core/protocol/transport.py); the server asks it.
    transport: Transport = "fp32"
    int8_rounding: Rounding = "stochastic"
    error_feedback: StrictBool = True  # int8: the site carries its rounding residual to its next round
    setup_sha256: str
    weights: ObjectiveWeights = ObjectiveWeights()
    # Differential privacy asked by the server; a site's policy may still demand it, raise the
    # noise or refuse the round (the site decides).
    dp: StrictBool = False
    dp_noise_multiplier: float | None = Field(default=None, gt=0)
    dp_target_epsilon: float | None = Field(default=None, gt=0)  # over this run's planned steps
    dp_max_grad_norm: float | None = Field(default=None, gt=0)
    # Under DP, what trains (issue 68): "all" of the round's groups, or "encoders": only their
    # modality encoders (healthfm_core/model/groups.py ENCODER_PREFIXES), the rest kept as received,
    # so the noise is spread over far fewer parameters. Ignored without DP.
    dp_train: Literal["all", "encoders"] = "all"
    # The round's update leaves the site only masked (secure aggregation, issue 32); a site whose
    # policy requires it refuses a round without it.
    secure_aggregation: StrictBool = False

    def to_flat(self) -> dict[str, Any]:
        return to_flat(self)

    @classmethod
    def from_flat(cls, record: Mapping[str, Any]) -> RoundConfig:
        """From a received ConfigRecord; the keys the strategy adds beside it (STRATEGY_KEYS) ignored."""
        return from_flat(cls, record, what="round config", beside=STRATEGY_KEYS)
