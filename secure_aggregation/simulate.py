"""One secure round run in process: every site's and the server's steps in order, with sites
dropping out where asked, and a transcript of every message the server received.

For tests, the benchmark and simulations; a deployment runs the same steps, one Flower message
per stage, and the round (server/) owns the sequencing there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from healthfm_core.terms.groups import parameter_group
from secure_aggregation.config import SecAggConfig
from secure_aggregation.messages import EncryptedShares, MaskedInput, PublicKeys, UnmaskShares
from secure_aggregation.server import SecureAggregate, ServerRound
from secure_aggregation.site import SiteRound


@dataclass
class Transcript:
    """Everything the server (and so the SuperLink relaying it) received in one round."""

    keys: list[PublicKeys] = field(default_factory=list)
    shares: list[EncryptedShares] = field(default_factory=list)
    masked: list[MaskedInput] = field(default_factory=list)
    unmask: list[UnmaskShares] = field(default_factory=list)


class SimulatedRound(NamedTuple):
    result: SecureAggregate
    server: ServerRound
    transcript: Transcript
    sites: dict[int, SiteRound]  # with their secrets: for tests that play a leak on purpose


def run_secure_round(
    config: SecAggConfig,
    updates: Mapping[int, Mapping[str, np.ndarray]],
    counts: Mapping[int, Mapping[str, int]],
    *,
    drop_before_masking: Collection[int] = (),
    drop_after_masking: Collection[int] = (),
    group_of: Callable[[str], str] = parameter_group,
    randbytes: Callable[[int], bytes] = os.urandom,
    site_min_holders: int | None = None,
) -> SimulatedRound:
    """The round's aggregate, the server's state, the transcript and the sites. A site in
    `drop_before_masking` shares its keys and is gone before sending its masked vector; one in
    `drop_after_masking` sends its masked vector and is gone before unmasking. Raises
    SecAggError when too few sites remain (the server's own check). `site_min_holders`: every
    site's own floor (None: the config's min_holders, sites that accept the server's)."""
    floor = config.min_holders if site_min_holders is None else site_min_holders
    sites = {node: SiteRound(config, node, randbytes, floor) for node in config.sample}
    server = ServerRound(config)
    transcript = Transcript()
    transcript.keys = [site.advertise() for site in sites.values()]
    directory = server.key_directory(transcript.keys)
    transcript.shares = [sites[node].share_keys(directory) for node in directory.keys]
    inboxes = server.route_shares(transcript.shares)
    transcript.masked = [
        sites[node].mask(inboxes[node], updates[node], counts[node], group_of)
        for node in inboxes
        if node not in drop_before_masking
    ]
    request = server.unmask_request(transcript.masked)
    transcript.unmask = [sites[node].unmask(request) for node in request.survivors if node not in drop_after_masking]
    return SimulatedRound(server.aggregate(transcript.unmask), server, transcript, sites)
