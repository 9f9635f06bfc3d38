"""The federated task head's DP flags, one set for every command that trains a head: the
coordinator's `head` (a deployed federation) and the simulations' drivers
(simulations/federated_head_run.py, simulations/task_head.py). They are the pretraining run
config's `privacy` fields (server/config.PrivacyRequest) and the expected subjects per DP step."""

from __future__ import annotations

import argparse
from typing import Any

from server.config import PrivacyRequest


def add_head_dp_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--dp-target-epsilon | --dp-noise-multiplier, --dp-max-grad-norm, --dp-delta, --dp-batch-size;
    the group, for a caller's own DP flags."""
    dp = parser.add_argument_group("differential privacy (healthfm_core/privacy/head.py; docs/researcher.md)")
    level = dp.add_mutually_exclusive_group()
    level.add_argument("--dp-target-epsilon", type=float, help="ask DP-SGD reaching this epsilon over the head's steps")
    level.add_argument("--dp-noise-multiplier", type=float, help="ask DP-SGD at this noise multiplier")
    dp.add_argument("--dp-max-grad-norm", type=float, default=1.0, help="per-subject clipping norm (default 1)")
    dp.add_argument("--dp-delta", type=float, default=1e-5, help="the delta asked (a site accounts at its policy's)")
    dp.add_argument("--dp-batch-size", type=int, default=64, help="expected subjects per DP step (default 64)")
    dp.add_argument(
        "--dp-run-epsilon",
        type=float,
        help="the most epsilon this head run may spend at each site (a site refuses a round past it; default: "
        "only each site's lifetime cap)",
    )
    dp.add_argument(
        "--dp-max-noise-multiplier",
        type=float,
        help="the most noise a site's round may add (its policy's may be more than asked): the server's bound on a "
        "DP update assumes it, a site needing more refuses (default: the noise asked, or the largest a site's plan "
        "needs for --dp-target-epsilon)",
    )
    return dp


def head_dp_config(args: argparse.Namespace) -> dict[str, Any]:
    """HeadRunConfig's DP fields (privacy, dp_batch_size) from add_head_dp_args's flags
    (ValueError, pydantic's, for a value out of range)."""
    privacy = PrivacyRequest(
        target_epsilon=args.dp_target_epsilon,
        noise_multiplier=args.dp_noise_multiplier,
        delta=args.dp_delta,
        max_grad_norm=args.dp_max_grad_norm,
    )
    return {
        "privacy": privacy,
        "dp_batch_size": args.dp_batch_size,
        "dp_run_epsilon": args.dp_run_epsilon,
        "dp_max_noise_multiplier": args.dp_max_noise_multiplier,
    }


__all__ = ["add_head_dp_args", "head_dp_config"]
