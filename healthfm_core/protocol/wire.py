"""The wire's names and the strict models every message of the federation is built on.

Round 0's message types and records, the records of a reply, and the base models: a message the
server builds (`StrictMessage`) and a peer's reply (`PeerReply`, strict: a peer's 2.0 is not a
count). This package does not import flwr: records are plain mappings here, the ClientApp and the
ServerApp wrap them into Flower's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Final, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from healthfm_core.first_error import first_error

# Round 0's message types (Flower's "query.<action>"; the ClientApp registers each <action>).
CAPABILITIES = "query.capabilities"
CODE_STATS = "query.code_stats"
SETUP = "query.setup"

# Round 0's records (RecordDict keys) and their fields: a capabilities reply holds one ConfigRecord
# CAPABILITIES_RECORD (SiteCapabilities.to_flat); a code-stats reply CODE_STATS_RECORD
# {JSON_FIELD: SiteCodeStats as JSON}; a setup message SETUP_RECORD {JSON_FIELD: the setup's JSON,
# SHA256_FIELD: its sha256}, and its reply SETUP_RECORD {SHA256_FIELD} (the acknowledgement).
CAPABILITIES_RECORD = "capabilities"
CODE_STATS_RECORD = "code-stats"
SETUP_RECORD = "setup"
JSON_FIELD = "json"
SHA256_FIELD = "sha256"
# A train or evaluate message's ConfigRecord (RoundConfig / EvalConfig flat; Flower FedAvg's name).
CONFIG_RECORD = "config"


# The records of a reply (RecordDict keys): ArrayRecord, MetricRecord, ConfigRecord (refusals only).
ARRAYS_RECORD = "arrays"
METRICS_RECORD = "metrics"
STATUS_RECORD = "status"
STATUS_REFUSED: Final = "refused"  # Final: typed as the literal TrainReply.status takes
# A site asked to train or evaluate under a setup it does not hold (its SuperNode restarted and
# lost the run's state) answers with only this ConfigRecord: {"wanted": sha256, "held": sha256 or ""};
# the server sends it query.setup again and retries it.
SETUP_NEEDED_RECORD = "setup-needed"


class StrictMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]


class PeerReply(BaseModel):
    # strict: a peer's 2.0 is not a count, its "1.5" not a loss; arrays are numpy arrays.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, arbitrary_types_allowed=True)


_ReplyT = TypeVar("_ReplyT", bound=BaseModel)


def validate_peer(
    cls: type[_ReplyT],
    data: dict[str, Any],
    *,
    what: str,
    wire: Callable[[tuple[Any, ...]], str],
    context: Mapping[str, Any] | None = None,
) -> _ReplyT:
    """cls.model_validate(data), a failure as one ValueError naming the wire field and value."""
    try:
        return cls.model_validate(data, context=dict(context or {}))
    except ValidationError as err:
        raise ValueError(first_error(err, what, wire)) from None
