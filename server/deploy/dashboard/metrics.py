"""/metrics: the federation in Prometheus's text format (prometheus_client writes it), for the
monitoring a hospital's IT team already runs. One scrape reads the same view as the page.

    healthfm_sites_registered                     gauge
    healthfm_sites_online                         gauge (the Control API's online nodes of the registry)
    healthfm_site_online{site}                    gauge 1/0
    healthfm_superlink_up                         gauge 1: the Control API answered
    healthfm_run_rounds_done{run_id}              gauge
    healthfm_run_rounds_planned{run_id}           gauge
    healthfm_run_status{run_id,status}            gauge 1 for the run's status
    healthfm_round_seconds{run_id,phase}          gauge, the run's last round: round, training, waiting, aggregation
    healthfm_replies_rejected_total{run_id}       counter
    healthfm_bytes_sent_total{run_id}             counter (to the sites)
    healthfm_bytes_received_total{run_id}         counter (from the sites)
    healthfm_audit_chain_ok{run_id}               gauge 1 whole, 0 broken
    healthfm_site_epsilon{site}                   gauge, the site's cumulative epsilon (its last DP round)
    healthfm_site_epsilon_cap{site}               gauge, its policy's epsilon cap (sites that report one)
    healthfm_site_delta{site}                     gauge
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.deploy.dashboard.nodes import NodesAnswer
from server.deploy.dashboard.view import FederationView, RunView


def latest_runs(view: FederationView) -> list[RunView]:
    """One run per out-dir, its latest launch (an out-dir's files are that run's)."""
    seen, out = set(), []
    for run in view.runs:  # newest first
        if run.launch.out_dir not in seen:
            seen.add(run.launch.out_dir)
            out.append(run)
    return out


class FederationCollector(Collector):
    def __init__(self, view: FederationView, nodes: NodesAnswer) -> None:
        self.view, self.nodes = view, nodes

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        view, nodes = self.view, self.nodes
        yield GaugeMetricFamily("healthfm_sites_registered", "Sites in the coordinator's registry", len(view.sites))
        online = GaugeMetricFamily("healthfm_site_online", "1 when the site's node is online", labels=["site"])
        count = 0
        for site in view.sites:
            state = nodes.nodes.get(site.node_id)
            up = int(state is not None and state.status == "online")
            count += up
            online.add_metric([site.name], up)
        yield GaugeMetricFamily("healthfm_sites_online", "Registered sites whose node is online", count)
        yield online
        yield GaugeMetricFamily("healthfm_superlink_up", "1 when the Control API answered", int(not nodes.problem))
        done = GaugeMetricFamily("healthfm_run_rounds_done", "Rounds the run has done", labels=["run_id"])
        planned = GaugeMetricFamily("healthfm_run_rounds_planned", "Rounds the run is to do", labels=["run_id"])
        status = GaugeMetricFamily("healthfm_run_status", "1 for the run's status", labels=["run_id", "status"])
        seconds = GaugeMetricFamily(
            "healthfm_round_seconds", "The run's last round, by phase", labels=["run_id", "phase"], unit="seconds"
        )
        rejected = CounterMetricFamily("healthfm_replies_rejected", "Replies rejected by the server", labels=["run_id"])
        sent = CounterMetricFamily("healthfm_bytes_sent", "Bytes sent to the sites", labels=["run_id"])
        received = CounterMetricFamily("healthfm_bytes_received", "Bytes received from the sites", labels=["run_id"])
        audit = GaugeMetricFamily("healthfm_audit_chain_ok", "1 when the audit chain verifies", labels=["run_id"])
        for run in latest_runs(view):
            rid = str(run.launch.run_id)
            done.add_metric([rid], max(run.rounds_done, len(run.rounds)))
            planned.add_metric([rid], run.rounds_planned)
            status.add_metric([rid, run.status], 1)
            if run.rounds:
                last = run.rounds[-1]
                for phase, value in (
                    ("round", last.seconds),
                    ("training", last.training),
                    ("waiting", last.waiting),
                    ("aggregation", last.aggregation),
                ):
                    if value is not None:
                        seconds.add_metric([rid, phase], value)
            rejected.add_metric([rid], sum(len(r.rejected) for r in run.rounds))
            sent.add_metric([rid], sum(r.bytes_sent for r in run.rounds))
            received.add_metric([rid], sum(r.bytes_received for r in run.rounds))
            if run.audit is not None:
                audit.add_metric([rid], int(run.audit.ok))
        yield from (done, planned, status, seconds, rejected, sent, received, audit)
        epsilon = GaugeMetricFamily("healthfm_site_epsilon", "The site's cumulative epsilon", labels=["site"])
        delta = GaugeMetricFamily("healthfm_site_delta", "The delta of the site's epsilon", labels=["site"])
        cap = GaugeMetricFamily("healthfm_site_epsilon_cap", "The site policy's epsilon cap", labels=["site"])
        for p in view.privacy:
            epsilon.add_metric([p.site], p.points[-1].epsilon)
            if p.delta is not None:
                delta.add_metric([p.site], p.delta)
            if p.epsilon_cap is not None:
                cap.add_metric([p.site], p.epsilon_cap)
        yield from (epsilon, delta, cap)


def metrics_text(view: FederationView, nodes: NodesAnswer) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FederationCollector(view, nodes))
    return generate_latest(registry)
