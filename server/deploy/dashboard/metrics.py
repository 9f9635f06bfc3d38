"""/metrics: the federation in Prometheus's text format (prometheus_client writes it), for the
monitoring a hospital's IT team already runs. One scrape reads the same view as the page, and
names the same states (states.py).

Bounded: no series carries a run id but healthfm_run_info, and run figures are the current
run's (the newest launch): a federation that launches every day adds no series. Per site, the
sites provisioned.

    healthfm_superlink_up                      gauge 1: the Control API answered (0: every site's connection unknown)
    healthfm_sites_provisioned                 gauge
    healthfm_sites_registered                  gauge
    healthfm_sites_online                      gauge (absent while the SuperLink does not answer)
    healthfm_site_online{site}                 gauge 1/0, registered sites (absent while unknown)
    healthfm_site_state{site,state}            gauge 1 for its connection: provisioned, online, offline, unknown
    healthfm_site_round_state{site,state}      gauge 1 for its part in the current run's latest round naming it:
                                               ok, lost, refusing, rejected, error, absent
    healthfm_site_rounds_total{site,state}     counter: the current run's rounds by the site's state
    healthfm_run_info{run_id,status}           gauge 1: the current run
    healthfm_run_rounds_done                   gauge, the current run
    healthfm_run_rounds_planned                gauge
    healthfm_runs{status}                      gauge: runs (latest launch of each out-dir) by status
    healthfm_round_in_flight                   gauge: the current run's round in flight (absent: none)
    healthfm_round_phase{phase}                gauge 1 for the phase in flight (live.json's)
    healthfm_round_phase_seconds               gauge: how long the phase has lasted
    healthfm_round_sites_awaited               gauge: sites whose reply the phase waits for
    healthfm_round_seconds{phase}              gauge, the current run's last round recorded: round, before_sending,
                                               training, waiting, aggregation
    healthfm_replies_rejected_total            counter: the current run's replies the server rejected (not refusals,
                                               not lost sites: healthfm_site_rounds_total has those)
    healthfm_bytes_sent_total                  counter, the current run (to the sites)
    healthfm_bytes_received_total              counter, the current run (from the sites)
    healthfm_audit_chain_ok                    gauge 1: the current run's audit chain and its head verify
    healthfm_audit_logs_unverified             gauge: audit logs of every run that do not verify
    healthfm_site_epsilon{site}                gauge, the site's cumulative epsilon (its last DP round trained)
    healthfm_site_epsilon_cap{site}            gauge, its policy's epsilon cap (sites that report one)
    healthfm_site_delta{site}                  gauge
    healthfm_site_dp_rounds{site}              gauge: rounds it trained under DP (its ledger's count)
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.deploy.dashboard.nodes import NodesAnswer
from server.deploy.dashboard.states import CONNECTION_STATES, ROUND_STATES, connection_state
from server.deploy.dashboard.view import FederationView, RunView

RUN_STATUSES = ("running", "interrupted", "completed", "failed", "not started")


def latest_runs(view: FederationView) -> list[RunView]:
    """One run per out-dir, its latest launch (an out-dir's files are that run's)."""
    seen, out = set(), []
    for run in view.runs:  # newest first
        if run.launch.out_dir not in seen:
            seen.add(run.launch.out_dir)
            out.append(run)
    return out


class FederationCollector(Collector):
    def __init__(self, view: FederationView, nodes: NodesAnswer, now: float) -> None:
        self.view, self.nodes, self.now = view, nodes, now

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield from self._sites()
        yield from self._runs()
        yield from self._privacy()

    def _sites(self) -> Iterator[GaugeMetricFamily]:
        view, nodes = self.view, self.nodes
        yield GaugeMetricFamily("healthfm_superlink_up", "1 when the Control API answered", int(nodes.answered))
        registered = [s for s in view.sites if s.registered]
        yield GaugeMetricFamily("healthfm_sites_provisioned", "Sites provisioned in FED", len(view.sites))
        yield GaugeMetricFamily("healthfm_sites_registered", "Sites in the coordinator's registry", len(registered))
        online = GaugeMetricFamily("healthfm_site_online", "1 when the site's node is online", labels=["site"])
        state = GaugeMetricFamily("healthfm_site_state", "1 for the site's connection state", labels=["site", "state"])
        count = 0
        for site in view.sites:
            node = nodes.nodes.get(site.node_id)
            now = connection_state(site.registered, nodes.answered, node.status if node is not None else None)
            for name in CONNECTION_STATES:
                state.add_metric([site.name, name], int(name == now))
            if site.registered and nodes.answered:
                count += now == "online"
                online.add_metric([site.name], int(now == "online"))
        if nodes.answered:  # unknown is not zero: no series rather than every site offline
            yield GaugeMetricFamily("healthfm_sites_online", "Registered sites whose node is online", count)
        yield online
        yield state

    def _runs(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        runs = latest_runs(self.view)
        statuses = GaugeMetricFamily(
            "healthfm_runs", "Runs (latest launch of each out-dir) by status", labels=["status"]
        )
        for status in RUN_STATUSES:
            statuses.add_metric([status], sum(r.status == status for r in runs))
        yield statuses
        unverified = sum(r.audit is not None and not r.audit.ok for r in runs)
        yield GaugeMetricFamily("healthfm_audit_logs_unverified", "Audit logs that do not verify", unverified)
        if not self.view.runs:
            return
        run = self.view.runs[0]  # the newest launch
        info = GaugeMetricFamily(
            "healthfm_run_info", "The current run (the newest launch)", labels=["run_id", "status"]
        )
        info.add_metric([str(run.launch.run_id), run.status], 1)
        yield info
        yield GaugeMetricFamily(
            "healthfm_run_rounds_done", "Rounds the current run has done", max(run.rounds_done, run.rounds_recorded)
        )
        yield GaugeMetricFamily("healthfm_run_rounds_planned", "Rounds the current run is to do", run.rounds_planned)
        yield from self._live(run)
        seconds = GaugeMetricFamily(
            "healthfm_round_seconds",
            "The current run's last round recorded, by phase",
            labels=["phase"],
            unit="seconds",
        )
        if run.rounds:
            last = run.rounds[-1]
            for phase, value in (
                ("round", last.seconds),
                ("before_sending", last.before_sending),
                ("training", last.training),
                ("waiting", last.waiting),
                ("aggregation", last.aggregation),
            ):
                if value is not None:
                    seconds.add_metric([phase], value)
        yield seconds
        round_state = GaugeMetricFamily(
            "healthfm_site_round_state",
            "1 for the site's state in the latest round naming it",
            labels=["site", "state"],
        )
        rounds = CounterMetricFamily(
            "healthfm_site_rounds", "The current run's rounds by site state", labels=["site", "state"]
        )
        rejected = 0
        for site, latest in sorted(run.latest.items()):
            for name in ROUND_STATES:
                round_state.add_metric([site, name], int(latest.state == name))
                rounds.add_metric([site, name], run.state_counts.get(site, {}).get(name, 0))
            rejected += run.state_counts.get(site, {}).get("rejected", 0)
        yield round_state
        yield rounds
        yield CounterMetricFamily("healthfm_replies_rejected", "Replies the server rejected, current run", rejected)
        yield CounterMetricFamily("healthfm_bytes_sent", "Bytes sent to the sites, current run", run.bytes_sent)
        yield CounterMetricFamily(
            "healthfm_bytes_received", "Bytes received from the sites, current run", run.bytes_received
        )
        if run.audit is not None:
            yield GaugeMetricFamily(
                "healthfm_audit_chain_ok", "1 when the current run's audit log verifies", int(run.audit.ok)
            )

    def _live(self, run: RunView) -> Iterator[GaugeMetricFamily]:
        if run.live is None:
            return
        live = run.live.state
        yield GaugeMetricFamily("healthfm_round_in_flight", "The current run's round in flight", live.round)
        phase = GaugeMetricFamily("healthfm_round_phase", "1 for the phase in flight", labels=["phase"])
        phase.add_metric([live.phase], 1)
        yield phase
        yield GaugeMetricFamily(
            "healthfm_round_phase_seconds", "How long the phase in flight has lasted", max(0.0, self.now - live.since)
        )
        yield GaugeMetricFamily("healthfm_round_sites_awaited", "Sites the phase waits for", len(live.waiting_for))

    def _privacy(self) -> Iterator[GaugeMetricFamily]:
        epsilon = GaugeMetricFamily("healthfm_site_epsilon", "The site's cumulative epsilon", labels=["site"])
        delta = GaugeMetricFamily("healthfm_site_delta", "The delta of the site's epsilon", labels=["site"])
        cap = GaugeMetricFamily("healthfm_site_epsilon_cap", "The site policy's epsilon cap", labels=["site"])
        dp_rounds = GaugeMetricFamily("healthfm_site_dp_rounds", "Rounds the site trained under DP", labels=["site"])
        for p in self.view.privacy:
            epsilon.add_metric([p.site], p.points[-1].epsilon)
            dp_rounds.add_metric([p.site], p.dp_rounds)
            if p.delta is not None:
                delta.add_metric([p.site], p.delta)
            if p.epsilon_cap is not None:
                cap.add_metric([p.site], p.epsilon_cap)
        yield from (epsilon, delta, cap, dp_rounds)


def metrics_text(view: FederationView, nodes: NodesAnswer, now: float | None = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FederationCollector(view, nodes, time.time() if now is None else now))
    return generate_latest(registry)
