"""Every secure-aggregation message survives its flat form (a Flower ConfigRecord's values) and
is parsed by its model; the masked vector stays raw bytes (its size is the wire's)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord
from helpers.secure_aggregation_fixtures import MIXES, group_of, make_config, site_updates
from pydantic import BaseModel

from healthfm_core.protocol.flat import from_flat, to_flat
from secure_aggregation.config import SecAggConfig
from secure_aggregation.messages import KeyDirectory, MaskedInput, ShareInbox
from secure_aggregation.simulate import run_secure_round


def _through_flower(message: BaseModel) -> dict[str, object]:
    return dict(ConfigRecord(to_flat(message)))


def test_every_message_round_trips_through_a_config_record() -> None:
    config = make_config(MIXES, threshold=3)
    updates, counts = site_updates(MIXES)
    _, server, transcript, _ = run_secure_round(config, updates, counts, group_of=group_of)
    assert server.directory is not None and server.request is not None
    inbox = ShareInbox(round=config.round, ciphertexts=transcript.shares[0].ciphertexts)
    messages: list[BaseModel] = [
        config,
        server.directory,
        inbox,
        server.request,
        *transcript.keys,
        *transcript.shares,
        *transcript.masked,
        *transcript.unmask,
    ]
    for message in messages:
        assert from_flat(type(message), _through_flower(message)) == message
    masked = transcript.masked[0]
    flat = to_flat(masked)
    assert flat["vector"] == masked.vector and sum(len(str(v)) for k, v in flat.items() if k != "vector") < 200


def test_a_flat_record_that_does_not_parse_is_refused() -> None:
    config = make_config(MIXES, threshold=3)
    flat = to_flat(config)
    with pytest.raises(ValueError, match="unexpected key"):
        from_flat(SecAggConfig, {**flat, "extra": b"x"})
    with pytest.raises(ValueError, match="threshold 2: expected in"):
        from_flat(SecAggConfig, {**flat, "threshold": 2})
    with pytest.raises(ValueError, match=r"field vector: value \(missing\)"):
        from_flat(MaskedInput, {"node-id": 1, "round": 7, "groups": []})
    with pytest.raises(ValueError, match="bytes > limit 10"):
        from_flat(KeyDirectory, {"round": 7, "keys": "{}"}, max_bytes=10)
