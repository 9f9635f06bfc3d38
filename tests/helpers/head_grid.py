"""The federated task head over an in-process grid: the release's keys, the grid, and the
sites' nodes and head config the head tests share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from flwr.app import Message

from client.head_app import make_head_client_app
from client.head_rows import HeadRows
from client.policy import load_policy
from healthfm_core.eval.federated_head import SiteSplits
from healthfm_core.privacy.ledger import PrivacyLedger
from healthfm_core.protocol.head import HEAD_RECORD, MSG_TRAIN
from helpers.in_process_grid import InProcessGrid
from server.config import PrivacyRequest
from server.head_app import HeadRunConfig

SHA = "ab" * 32


WEIGHTS = "cd" * 32  # the release weights' sha256 a saved head records


KEY = "onset_x_365d"


class HeadGrid(InProcessGrid):
    """InProcessGrid with the head's ClientApp; `corrupt` rewrites one node's train.head replies."""

    def __init__(self, node_configs: dict[int, dict], app: Any, corrupt: tuple[int, Any] | None = None) -> None:
        super().__init__(node_configs)
        self.app, self.corrupt = app, corrupt
        self.replies: list[Message] = []

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:  # noqa: ANN001
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            if self.corrupt is not None and reply.metadata.src_node_id == self.corrupt[0] and not reply.has_error():
                if messages[0].metadata.message_type == MSG_TRAIN:
                    self.corrupt[1](reply.content.config_records[HEAD_RECORD])
        self.replies.extend(replies)
        return replies


BATCH = 16  # expected subjects per DP step


DELTA = 1e-3


def site_splits(name: str) -> SiteSplits:
    """A site's train and tuning rows: 2 or 3 rows (prediction times) per subject."""
    i = int(name[-1])
    rng = np.random.default_rng(i)
    subjects = np.repeat(np.arange(80 + 40 * i), 2 + i % 2)
    x = rng.normal(size=(len(subjects), 5)) + rng.normal(size=(len(np.unique(subjects)), 5))[subjects]
    y = (x[:, 0] - 0.5 * x[:, 1] + rng.normal(size=len(x))) > 0
    n_tune = 40
    return SiteSplits(x[n_tune:], y[n_tune:], x[:n_tune], y[:n_tune], train_subjects=1000 * i + subjects[n_tune:])


def site_nodes(tmp: Path, caps: Sequence[float | None], mandatory: bool = False) -> list[dict[str, Any]]:
    """One node config per site: its policy (a DP budget with `cap`; None: a policy without one)
    and its own state directory."""
    out = []
    for i, cap in enumerate(caps):
        policy: dict[str, Any] = {"min_subjects": 5}
        if cap is not None:
            policy["dp"] = {"epsilon_cap": cap, "delta": DELTA, "max_grad_norm": 1.0, "mandatory": mandatory}
            if mandatory:
                policy["dp"]["noise_multiplier"] = 2.0
        path = tmp / f"site{i}" / "policy.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(policy))
        out.append({"site-name": f"site{i}", "policy": str(path), "state-dir": str(tmp / f"site{i}" / "state")})
    return out


def head_config(out: Path, privacy: PrivacyRequest | None = None) -> HeadRunConfig:
    return HeadRunConfig(
        model=out,
        out_dir=out,
        keys=[KEY],
        c_grid=list(C_GRID),
        rounds=ROUNDS,
        local_steps=STEPS,
        timeout_s=30,
        privacy=privacy or PrivacyRequest(),
        dp_batch_size=BATCH,
    )


def in_process_grid(nodes: Sequence[Mapping[str, Any]], corrupt: tuple[int, Any] | None = None) -> HeadGrid:
    return HeadGrid(
        {100 + i: dict(n) for i, n in enumerate(nodes)}, make_head_client_app(rows_of=synthetic_rows), corrupt
    )


C_GRID = (0.1, 1.0)


ROUNDS = 3


STEPS = 2


def synthetic_rows(config: Mapping[str, Any], tasks: Sequence[str]) -> HeadRows:
    """The head's rows of a site named in its node config, with the site's real DP budget (its
    policy file) and its real durable ledger (its state directory), as load_head_rows gives them.
    Module-level: Ray pickles it by reference (tests/ is on the actors' PYTHONPATH)."""
    name = str(config["site-name"])
    policy = load_policy(config["policy"]) if config.get("policy") else None
    ledger = PrivacyLedger(config["state-dir"]) if config.get("state-dir") else None
    return HeadRows(name, SHA, 64, 8, {KEY: site_splits(name)}, policy.dp if policy else None, ledger)
