"""A run recorded by the real server for the dashboard's fast test (tests/deploy/test_dashboard.py): the
FederationServer over tests/helpers/in_process_grid.py (each site's real ClientApp in this process), three
tiny synthetic sites, one of them under DP by its own policy, secure aggregation, a site whose
replies stop arriving after round 1 (killed), and a federated evaluation. What it writes is what a
deployed run writes (rounds.jsonl, audit.jsonl, outcome.json, evaluation.json); the test copies
the files kept under tests/data/dashboard_run/ (checkpoints left out) into a federation folder.

Regenerate (a few minutes on 2 cores):

    PYTHONPATH=$PWD:$PWD/tests python tests/dashboard_record.py tests/data/dashboard_run
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from flwr.app import Message
from helpers.in_process_grid import InProcessGrid, set_serverapp_identity
from helpers.run_configs import three_site_config

from server.server_app import FederationServer
from simulations.synthetic import generate_federation

REPO = Path(__file__).resolve().parents[1]
KEPT = ("rounds.jsonl", "audit.jsonl", "audit.anchor.json", "outcome.json", "evaluation.json")
DP_SITE, KILLED_SITE = "genomics", "hospital"
# The run's groups open over 2 holders (one is withheld when the killed site leaves 1): every
# site's policy lowers its own floor (secagg_min_holders, default 3) to that.
PLAIN_POLICY = "secagg_min_holders: 2\n"
DP_POLICY = """secagg_min_holders: 2
dp:
  mandatory: true
  epsilon_cap: 40.0
  delta: 1.0e-3
  noise_multiplier: 1.0
"""


class KilledAfterRound1(InProcessGrid):
    """The named site's replies never arrive after the first round's exchanges: it was killed."""

    def __init__(self, node_configs: dict[int, dict], killed: str) -> None:
        super().__init__(node_configs)
        self.killed = next(n for n, c in node_configs.items() if c["site-name"] == killed)
        self.rounds_seen = 0

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "query.secagg_keys":
            self.rounds_seen += 1
        replies = super().send_and_receive(messages, timeout=timeout)
        if self.rounds_seen >= 2 or (messages and messages[0].metadata.message_type == "evaluate"):
            replies = [r for r in replies if r.metadata.src_node_id != self.killed]
        return replies


def record(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = generate_federation(root / "sites", "tiny", seed=0, n_subjects=240, progress=False)
        policy, plain = root / "dp-policy.yaml", root / "policy.yaml"
        policy.write_text(DP_POLICY)
        plain.write_text(PLAIN_POLICY)
        nodes = {}
        for i, site in enumerate(manifest.sites):
            config = {"site-root": str(site.root), "site-name": site.name, "min-code-subjects": 5}
            config["min-report-subjects"] = 5
            config["min-report-positives"] = 2
            config["state-dir"] = str(root / f"state-{site.name}")
            config["policy"] = str(policy if site.name == DP_SITE else plain)
            nodes[100 + i] = config
        out = root / "run"
        cfg = three_site_config(
            out,
            rounds=2,
            min_nodes=3,
            secure_aggregation=True,
            secagg_min_holders=2,
            eval_tasks=["onset_hypertension_365d"],
            timeout_s=30,
        )
        with pytest.MonkeyPatch.context() as mp:
            set_serverapp_identity(mp)
            FederationServer(KilledAfterRound1(nodes, KILLED_SITE), cfg, run_id=7).run()
        dest.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            shutil.copyfile(out / name, dest / name)


if __name__ == "__main__":
    record(Path(sys.argv[1]))
