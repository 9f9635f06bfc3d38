"""The run's sites and round 0: who is admitted, what each trains, and the setup every site holds.

Round 0 (every run, resumed or not):
  1. capabilities query: each site's modalities and subject counts -> the groups it trains
     (Roster.node_groups);
  2. vocabulary agreement (fresh runs): each site's SiteCodeStats (aggregates, already suppressed
     below the site's minimum) -> build_vocabulary -> FederationSetup (vocabulary, model config,
     init seed); a resumed run takes the setup from its checkpoint instead;
  3. the setup goes to every site (query.setup); sites acknowledge its sha256.
A SuperNode restarted mid-run has lost the setup; the round (server/round.py) and the evaluation
send it again through `resend_setup`. Deployed runs admit only the coordinator's registered nodes
(server/deploy/registry.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from healthfm_core.data.sequences.code_stats import SiteCodeStats
from healthfm_core.data.sequences.vocab import build_vocabulary
from healthfm_core.protocol import (
    CAPABILITIES,
    CAPABILITIES_RECORD,
    CODE_STATS,
    CODE_STATS_RECORD,
    JSON_FIELD,
    SETUP,
    SETUP_RECORD,
    SHA256_FIELD,
    FederationSetup,
    SiteCapabilities,
    federation_modalities,
)
from healthfm_core.strict_files import strict_model
from server.config import FederationConfig
from server.deploy.registry import SiteRegistry, admit, name_mismatch, read_registry
from server.exchange import send_and_receive
from server.live_round import EVALUATING, LiveRound

log = logging.getLogger("healthfm.server")
# Before each round after round 0, how long the server waits for min_nodes sites (a SuperNode
# restarting reconnects within this) before going on with those connected; never longer than timeout_s.
REJOIN_WAIT_S = 60.0


class Roster:
    """The run's sites on a Grid: admission, the groups each trains, round 0's handshake."""

    def __init__(self, grid: Grid, cfg: FederationConfig) -> None:
        self.grid, self.cfg = grid, cfg
        self.sites: dict[int, SiteCapabilities] = {}  # node id -> capabilities
        self.node_groups: dict[int, list[str]] = {}  # node id -> groups it trains (this run's sites)
        self.setup: FederationSetup | None = None  # the run's setup, once agreed (re-sent to a restarted site)
        # Deployed runs: only the coordinator's registered nodes take part (server/deploy/registry.py).
        self.registry: SiteRegistry | None = read_registry(cfg.registry) if cfg.registry else None
        self.errors: dict[int, str] = {}  # node id -> the last error a site replied (its reason)
        self.refused_nodes: set[int] = set()  # connected nodes the registry does not know
        self.live = LiveRound()  # what the run is doing now (live.json; the ServerApp sets its own)

    def site(self, node_id: int) -> str:
        """A node's site name (its capabilities', else the registry's, else node-<id>)."""
        caps = self.sites.get(node_id)
        if caps is None and self.registry is not None:
            return self.registry.by_node().get(node_id, f"node-{node_id}")
        return caps.site if caps else f"node-{node_id}"

    def ask(self, message_type: str, contents: Mapping[int, RecordDict]) -> dict[int, Message]:
        """Send one message per node, return the non-error replies by node (errors logged)."""
        messages = [Message(content, dst_node_id=node, message_type=message_type) for node, content in contents.items()]
        phase = EVALUATING if message_type == MessageType.EVALUATE else message_type
        self.live.sent(phase, {self.site(node): self.node_groups.get(node, []) for node in contents})
        replies = send_and_receive(
            self.grid,
            messages,
            self.cfg.timeout_s,
            on_reply=lambda reply: self.live.replied(
                self.site(reply.metadata.src_node_id), reply.error.reason if reply.has_error() else ""
            ),
        )
        out: dict[int, Message] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("%s: site %s replied with an error: %s", message_type, self.site(node), reply.error.reason)
                self.errors[node] = reply.error.reason or "no reason given"
                continue
            out[node] = reply
        for node in contents:
            if node not in out:
                log.warning("%s: no usable reply from site %s", message_type, self.site(node))
        return out

    def wait_for_nodes(self, before: str = "round 0") -> list[int]:
        """Wait for min_nodes connected sites: up to timeout_s before round 0, which fails without
        them; up to REJOIN_WAIT_S before a later round, which then goes on with the sites there are
        (a site down for good must not stop the run; one restarting is given a minute)."""
        limit = self.cfg.timeout_s if before == "round 0" else min(self.cfg.timeout_s, REJOIN_WAIT_S)
        deadline = time.monotonic() + limit
        said = 0.0
        while len(nodes := self.admitted(self.grid.get_node_ids())) < self.cfg.min_nodes:
            if time.monotonic() > deadline:
                if before == "round 0":
                    raise TimeoutError(
                        f"only {len(nodes)} of {self.cfg.min_nodes} sites connected within {self.cfg.timeout_s} s"
                    )
                log.warning(
                    "%s: only %d of %d sites connected after %g s; going on without the others",
                    before,
                    len(nodes),
                    self.cfg.min_nodes,
                    limit,
                )
                break
            if time.monotonic() - said > 30:
                log.info("%s: waiting for sites: %d connected, %d required", before, len(nodes), self.cfg.min_nodes)
                said = time.monotonic()
            self.live.waiting_for_sites([self.site(n) for n in nodes], self.cfg.min_nodes, limit)
            time.sleep(1.0)
        return nodes

    def admitted(self, nodes: Iterable[int]) -> list[int]:
        """The connected nodes that may take part (all of them without a registry)."""
        if self.registry is None:
            return sorted(nodes)
        admitted, refused = admit(nodes, self.registry)
        for node in sorted(set(refused) - self.refused_nodes):
            log.warning(
                "node %d is connected but not in the coordinator's registry %s: refused (it is sent "
                "nothing and nothing of it is averaged)",
                node,
                self.cfg.registry,
            )
        self.refused_nodes.update(refused)
        return admitted

    def _refused_reasons(self, nodes: Iterable[int]) -> str:
        """The sites' own reasons (error replies), for a run that cannot go on."""
        reasons = [f"{self.site(n)}: {self.errors[n]}" for n in sorted(nodes) if n in self.errors]
        return f" ({'; '.join(reasons)})" if reasons else ""

    # ------------------------------------------------------------------ round 0

    def query_capabilities(self, nodes: Iterable[int]) -> None:
        replies = self.ask(CAPABILITIES, {n: RecordDict() for n in nodes})
        seen: dict[str, int] = {}
        for node, reply in sorted(replies.items()):
            try:
                caps = SiteCapabilities.from_flat(reply.content.config_records[CAPABILITIES_RECORD])
            except (KeyError, ValueError) as err:
                log.warning("capabilities of node %d rejected: %s", node, err)
                continue
            if self.registry is not None and (why := name_mismatch(node, caps.site, self.registry)):
                log.warning("capabilities of node %d refused: %s", node, why)
                continue
            if caps.site in seen:
                raise RuntimeError(
                    f"two sites call themselves {caps.site!r} (nodes {seen[caps.site]} and {node}): "
                    "site names must be unique (node config site-name)"
                )
            seen[caps.site] = node
            self.sites[node] = caps
        if not self.sites:
            raise RuntimeError(f"no site answered the capabilities query{self._refused_reasons(nodes)}")
        self.node_groups = {node: caps.groups for node, caps in self.sites.items()}
        for node, caps in sorted(self.sites.items(), key=lambda kv: kv[1].site):
            log.info(
                "site %-12s node %d: modalities %s, subjects %s -> groups %s",
                caps.site,
                node,
                caps.modalities,
                caps.subjects,
                caps.groups,
            )

    def agree_vocabulary(self) -> FederationSetup:
        replies = self.ask(CODE_STATS, {n: RecordDict() for n in self.sites})
        stats: list[SiteCodeStats] = []
        for node, reply in sorted(replies.items(), key=lambda kv: self.site(kv[0])):
            try:
                record = reply.content.config_records[CODE_STATS_RECORD]
                stats.append(strict_model(SiteCodeStats, str(record[JSON_FIELD]), "a site's code statistics"))
            except (KeyError, ValueError) as err:
                log.warning("code statistics of site %s rejected: %s", self.site(node), err)
        if not stats:
            raise RuntimeError("no site sent usable code statistics: cannot agree on a vocabulary")
        vocab = build_vocabulary(stats, min_subjects=self.cfg.vocab_min_subjects)
        log.info(
            "vocabulary agreed from %d sites: %d codes, %d PRS traits, %d numeric normalisers",
            len(stats),
            len(vocab.codes),
            vocab.n_prs_traits,
            len(vocab.numeric),
        )
        modalities = federation_modalities([caps.modalities for caps in self.sites.values()], vocab)
        log.info("model modalities: %s (the union of the sites')", modalities)
        return FederationSetup(
            vocabulary=vocab,
            model=self.cfg.model,
            model_seed=self.cfg.seed,
            modalities=modalities,
            **self.cfg.tokens.model_dump(),  # every site tokenises as the run config says
        )

    def deliver_setup(self, setup: FederationSetup, nodes: Iterable[int]) -> set[int]:
        """Send the setup (query.setup) to these nodes; the nodes that acknowledged its sha256."""
        record = ConfigRecord({JSON_FIELD: setup.to_json(), SHA256_FIELD: setup.sha256})
        replies = self.ask(SETUP, {n: RecordDict({SETUP_RECORD: record}) for n in nodes})
        accepted = set()
        for node, reply in replies.items():
            ack = reply.content.config_records.get(SETUP_RECORD)
            if ack is not None and ack.get(SHA256_FIELD) == setup.sha256:
                accepted.add(node)
        return accepted

    def send_setup(self, setup: FederationSetup) -> None:
        self.setup = setup
        accepted = self.deliver_setup(setup, list(self.sites))
        for node in list(self.sites):
            if node not in accepted:
                log.warning("site %s did not accept the setup; it takes no part in this run", self.site(node))
                self.node_groups.pop(node, None)
        # A site is sent only groups the model has (e.g. no genomics when no PRS trait was agreed).
        self.node_groups = {node: [g for g in groups if g in setup.groups] for node, groups in self.node_groups.items()}
        if not self.node_groups:
            raise RuntimeError("no site accepted the setup")

    def resend_setup(self, nodes: set[int], what: str) -> set[int]:
        """Send the setup again to nodes that lost it; those that took it (and may be retried)."""
        assert self.setup is not None
        names = ", ".join(sorted(self.site(n) for n in nodes))
        log.warning("%s: site(s) %s no longer hold the setup (SuperNode restarted?): sending it again", what, names)
        accepted = self.deliver_setup(self.setup, sorted(nodes))
        for node in sorted(nodes - accepted):
            log.warning("%s: site %s did not accept the setup sent again", what, self.site(node))
        return accepted
