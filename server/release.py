"""`coordinator release`: a run's final model as a release folder (healthfm_core/release.py).

Reads the run directory as the ServerApp left it: the latest checkpoint (global arrays, setup,
run config; verified by server/checkpoint.py), rounds.jsonl (sites, groups trained, epsilon) and
evaluation.json (the last evaluation, when it is of the checkpoint's round). The release records
the run's evaluation settings (its EvalConfig), so a site's own `client.py probe` reproduces the
run's evaluation on the same rows, and carries the model card (server/model_card.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from healthfm_core.release import FORMAT, GROUPS, VERSION, ReleaseMeta, write_release
from healthfm_core.strict_files import read_json
from server.checkpoint import latest_server_checkpoint, load_server_checkpoint
from server.config import FederationConfig, saved_run_config
from server.model_card import model_card
from server.outcome import untrained_groups
from server.runlog import read_events

log = logging.getLogger("healthfm.server")


class RunNotReleasable(ValueError):
    """The run directory holds nothing to release (no checkpoint), or its record is unusable."""


def release_run(
    run_dir: str | Path, out: str | Path, overwrite: bool = False, signing_key: Ed25519PrivateKey | None = None
) -> Path:
    """Write the release of the run in `run_dir` (its latest checkpoint) to `out`, signed with
    `signing_key` (the federation's; None: unsigned)."""
    run_dir = Path(run_dir)
    ckpt = latest_server_checkpoint(run_dir / "checkpoints")
    if ckpt is None:
        raise RunNotReleasable(f"{run_dir / 'checkpoints'}: no checkpoint (did the run complete a round?)")
    state = load_server_checkpoint(ckpt)
    try:
        cfg = FederationConfig.model_validate(saved_run_config(state.run_config))
    except ValueError as err:
        raise RunNotReleasable(f"{ckpt}: run config does not validate: {' '.join(str(err).split())[:300]}") from None
    events_path = run_dir / "rounds.jsonl"
    events = read_events(events_path) if events_path.is_file() else []
    start = [e for e in events if e["event"] in ("setup", "resume")]
    if start and start[-1].get("setup_sha256") not in (None, state.setup.sha256):
        raise RunNotReleasable(f"{events_path}: field setup_sha256 of the last setup is not the checkpoint's setup")
    trained = {
        g
        for e in events
        if e["event"] == "round" and e["round"] <= state.round
        for g, sites in e.get("contributors", {}).items()
        if sites
    }
    groups_trained = [g for g in GROUPS if g in trained]
    untrained = untrained_groups(events, state.setup.groups, state.round)
    evaluation: dict[str, Any] | None = None
    eval_path = run_dir / "evaluation.json"
    if eval_path.is_file():
        evaluation = read_json(eval_path)
        if evaluation.get("round") != state.round:
            log.warning(
                "%s is of round %s, the checkpoint of round %d: the release carries no evaluation",
                eval_path,
                evaluation.get("round"),
                state.round,
            )
            evaluation = None
    eval_config = cfg.eval_config(state.round, state.setup.sha256) if cfg.eval_tasks else None
    run_id = str(start[-1].get("run_id")) if start and start[-1].get("run_id") is not None else run_dir.name
    markdown, card = model_card(
        state.setup, cfg, events, evaluation, eval_config, run_id, state.round, groups_trained, untrained
    )
    meta = ReleaseMeta(
        format=FORMAT,
        version=VERSION,
        run_id=run_id,
        round=state.round,
        setup_sha256=state.setup.sha256,
        model_seed=state.setup.model_seed,
        modalities=state.setup.modalities,
        tokens=state.setup.tokens,
        groups=state.setup.groups,
        groups_trained=groups_trained,
        untrained_groups=untrained,
        min_report_subjects=cfg.vocab_min_subjects,
        evaluation=eval_config,
    )
    path = write_release(
        out, state.arrays, state.setup, meta, markdown, card, overwrite=overwrite, signing_key=signing_key
    )
    log.info("release of %s (round %d) written to %s", ckpt, state.round, path)
    return path


__all__ = ["RunNotReleasable", "release_run"]
