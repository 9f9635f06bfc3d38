"""benchmarks/round_hops.py: a deployed round's hops from the ServerApp's rounds.jsonl and a site's
SuperNode and app-guard log lines (as client/deploy/supernode_main.py and client/deploy/warm_clientapp.py write
them); the hops of the path sum to the round."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# The benchmark script loaded by its path: putting benchmarks/ on sys.path would let its
# secure_aggregation.py shadow the secure_aggregation package for every later test.
_SPEC = importlib.util.spec_from_file_location(
    "round_hops", Path(__file__).resolve().parents[2] / "benchmarks" / "round_hops.py"
)
assert _SPEC is not None and _SPEC.loader is not None
round_hops_module = importlib.util.module_from_spec(_SPEC)
sys.modules["round_hops"] = round_hops_module
_SPEC.loader.exec_module(round_hops_module)
HOPS = round_hops_module.HOPS
round_hops = round_hops_module.round_hops
stamp = round_hops_module.stamp
supernode_trains = round_hops_module.supernode_trains
warm_trains = round_hops_module.warm_trains

SUPERNODE_LOG = """\
\x1b[92mINFO 2026-11-22 10:00:00,100\x1b[0m:      Receiving: query.setup message (ID: aa)
\x1b[92mINFO 2026-11-22 10:00:00,200\x1b[0m:      Received successfully
\x1b[92mINFO 2026-11-22 10:00:00,900\x1b[0m:      Sending: query.setup message (ID: ab)
\x1b[92mINFO 2026-11-22 10:00:01,000\x1b[0m:      Sent successfully
\x1b[92mINFO 2026-11-22 10:00:10,500\x1b[0m:      [RUN 5, ROUND 1]
\x1b[92mINFO 2026-11-22 10:00:10,500\x1b[0m:      Receiving: train message (ID: b1)
\x1b[92mINFO 2026-11-22 10:00:11,500\x1b[0m:      Received successfully
\x1b[92mINFO 2026-11-22 10:00:22,400\x1b[0m:      Sending: train message (ID: b2)
\x1b[92mINFO 2026-11-22 10:00:23,000\x1b[0m:      Sent successfully
"""

GUARD_LOG = """\
2026-11-22 10:00:00,300 INFO healthfm.client.app_guard: task 1 of run 5: app bundle 98b8a6393876 approved, to the run's warm ClientApp
2026-11-22 10:00:00,800 INFO healthfm.client.warm: run 5: query.setup completed in 0.40 s (pull 0.10 s, ClientApp 0.20 s, push 0.10 s; warm task 3 of this process)
2026-11-22 10:00:10,700 INFO healthfm.client.app_guard: task 2 of run 5: app bundle 98b8a6393876 approved, to the run's warm ClientApp
2026-11-22 10:00:11,000 INFO healthfm_core.train.trainer: step 1/50 total=0.1
2026-11-22 10:00:22,500 INFO healthfm.client.warm: run 5: train completed in 11.60 s (pull 1.00 s, ClientApp 10.30 s, push 0.30 s; warm task 4 of this process)
"""


def test_a_sites_train_message_is_followed_through_its_logs() -> None:
    (node,) = supernode_trains(SUPERNODE_LOG.splitlines())
    assert (node.receiving, node.received, node.sending, node.sent) == tuple(
        stamp(f"2026-11-22 10:00:{s}") for s in ("10,500", "11,500", "22,400", "23,000")
    )
    (warm,) = warm_trains(GUARD_LOG.splitlines())
    assert warm.handed_over == stamp("2026-11-22 10:00:10,700") and warm.done == stamp("2026-11-22 10:00:22,500")
    assert (warm.pull, warm.app, warm.push) == (1.0, 10.3, 0.3)


def test_the_hops_of_a_round_sum_to_it() -> None:
    (node,) = supernode_trains(SUPERNODE_LOG.splitlines())
    (warm,) = warm_trains(GUARD_LOG.splitlines())
    sent_at = stamp("2026-11-22 10:00:10,000")
    event = {
        "timings": {
            "sent_at": sent_at,
            "configure_seconds": 0.2,
            "push_seconds": 0.3,
            "round_seconds": 14.0,
        },
        "sites": {"biobank": {"reply_after_seconds": 13.5, "train_seconds": 9.8}},
    }
    hops = round_hops(1, event, node, warm, "biobank")
    assert sum(hops[h] for h in HOPS) == pytest.approx(14.0)
    assert hops["node_poll"] == pytest.approx(0.2)  # push done at 10.3, the SuperNode pulled at 10.5
    assert hops["guard"] == pytest.approx(0.2)
    assert hops["app_pull"] == pytest.approx(1.2)  # handed over at 10.7, the handler began at 11.9
    assert hops["handler"] == pytest.approx(0.5) and hops["train"] == 9.8
    assert hops["node_send"] == pytest.approx(0.5) and hops["server_pull"] == pytest.approx(0.5)
    assert hops["after"] == pytest.approx(0.3) and hops["node_receive"] == pytest.approx(1.0)
    cold = round_hops(1, event, node, None, "biobank")  # no warm ClientApp line: those hops unknown
    assert cold["app_pull"] is None and cold["train"] == 9.8 and cold["node_poll"] == pytest.approx(0.2)
