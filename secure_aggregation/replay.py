"""The attack replay (issue 32): an attacker holding every message the server (and so the SuperLink
relaying it) received in a secure round, and the server's own state, tries to rebuild each
site's update. A privacy officer runs it on a recorded round (`record-transcript`):

    python -m secure_aggregation.replay RUN_DIR/transcript [--truth TRUTH.npz] [--min-holders N]

It prints, per (site, group), which masks it could remove and, given the true updates (an npz
of `<node>.<group>` -> the clipped update as the site masked it), its estimate's correlation with
the truth as Fisher's z; under "no closer than random" each z ~ N(0, 1). It also checks, without
the truth, that no group's sum was opened over fewer holders than the floor (--min-holders, the
sites' default 3: a sum over one holder is its update, over two each other's), nor any one site's
update with every mask removed (`exposed`). Exit 1 when either happened or the estimates are
closer than random (`looks_random`), 2 when the transcript does not parse.

The attacker, honest to the transcript: it splits each masked vector into its groups' segments;
removes every mask it can rebuild from the unmask shares it received (self-masks of seeds with at
least t shares; pairwise masks of mask keys with at least t shares, against every public key in
the key directory); reads what is left as quantised values (q Delta - c). The ciphertexts it
relays it cannot open (Fernet under keys it never sees). `leaked_*`: secrets the protocol never
releases, for a positive control only.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from scipy import stats

from healthfm_core.terms.groups import parameter_group
from secure_aggregation.config import DEFAULT_MIN_HOLDERS, SecAggConfig
from secure_aggregation.field import clip_update
from secure_aggregation.keys import agree, private_from_bytes
from secure_aggregation.layout import group_vector
from secure_aggregation.masks import field_dtype, mask_label, mask_stream
from secure_aggregation.transcript import SecureTranscript, TranscriptError, read_secure_round, round_dirs

# |z| beyond this is a leak at any practical number of (site, group) pairs (N(0, 1): p ~ 7e-6).
Z_LIMIT = 4.5
# The z's squares summed: chi-square's 0.999 quantile with one degree of freedom per pair.
CHI2_QUANTILE = 0.999


@dataclass(frozen=True)
class Estimate:
    """The attacker's best estimate of one site's update of one group, and what it removed."""

    values: np.ndarray  # float64, the group's length
    self_mask_removed: bool
    pair_masks_removed: int
    pair_masks: int  # the pairwise masks in the segment (one per other holder in the directory)


def attack(
    transcript: SecureTranscript,
    leaked_seeds: Mapping[tuple[int, str], bytes] | None = None,
    leaked_keys: Mapping[int, bytes] | None = None,
) -> dict[tuple[int, str], Estimate]:
    """Per (node, group) of every masked vector received: the estimate from the transcript alone."""
    config, directory = transcript.config, transcript.directory
    if config is None or directory is None:
        return {}  # the round failed before any masked vector: nothing to attack
    dtype = field_dtype(config.field_bits)
    seeds: dict[tuple[int, str], list[bytes]] = {}
    keys: dict[int, list[bytes]] = {}
    for reply in transcript.received.unmask:
        for node, by_group in reply.seed_shares.items():
            for group, share in by_group.items():
                seeds.setdefault((node, group), []).append(share)
        for node, share in reply.key_shares.items():
            keys.setdefault(node, []).append(share)
    known_seeds = {k: combine_shares(v[: config.threshold]) for k, v in seeds.items() if len(v) >= config.threshold}
    known_keys = {n: combine_shares(v[: config.threshold]) for n, v in keys.items() if len(v) >= config.threshold}
    known_seeds.update(leaked_seeds or {})
    known_keys.update(leaked_keys or {})
    estimates = {}
    for masked in transcript.received.masked:
        node = masked.node_id
        vector = np.frombuffer(masked.vector, dtype=np.dtype(dtype).newbyteorder("<"))
        start = 0
        for group in masked.groups:
            length = config.segment_length(group)
            segment = vector[start : start + length].astype(dtype)
            start += length
            own = (node, group) in known_seeds
            if own:
                label = mask_label(config.round, "self", group)
                segment = segment - mask_stream(known_seeds[(node, group)], label, segment.size, config.field_bits)
            removed = pairs = 0
            for other, other_keys in directory.keys.items():
                if other == node or group not in config.groups.get(other, []):
                    continue
                pairs += 1
                # The pair's secret from either end's private key and the other's public key.
                if node in known_keys:
                    secret = agree(private_from_bytes(known_keys[node]), other_keys.mask_key)
                elif other in known_keys and node in directory.keys:
                    secret = agree(private_from_bytes(known_keys[other]), directory.keys[node].mask_key)
                else:
                    continue
                removed += 1
                stream = mask_stream(secret, mask_label(config.round, "pair", group), segment.size, config.field_bits)
                segment = segment - stream if node < other else segment + stream
            values = segment[: config.group_sizes[group]].astype(np.float64)
            estimates[(node, group)] = Estimate(
                values * config.step(group) - config.value_range[group], own, removed, pairs
            )
    return estimates


def exposed(estimates: Mapping[tuple[int, str], Estimate], floor: int) -> list[str]:
    """What the transcript opened that no honest round opens: a group whose sum is readable over
    fewer holders than `floor` (each of them had its self-mask removed), or one site's update with
    its self-mask and every pairwise mask removed (its seed and its key both revealed). One line
    each; empty when nothing was."""
    problems = []
    opened: dict[str, list[int]] = {}
    for (node, group), estimate in sorted(estimates.items()):
        if estimate.self_mask_removed:
            opened.setdefault(group, []).append(node)
            if 0 < estimate.pair_masks == estimate.pair_masks_removed:  # a lone holder: the floor's case
                problems.append(f"node {node}'s update of {group!r}: every mask removed (its update in the clear)")
    for group, nodes in sorted(opened.items()):
        if len(nodes) < floor:
            problems.append(
                f"group {group!r} opened over {len(nodes)} holder(s) (nodes {nodes}) < min_holders {floor}: "
                "its sum is those sites' update(s)"
            )
    return problems


def true_updates(
    trained: Mapping[int, Mapping[str, np.ndarray]],
    initial: Mapping[str, np.ndarray],
    config: SecAggConfig,
    group_of: Callable[[str], str] = parameter_group,
) -> dict[tuple[int, str], np.ndarray]:
    """Each site's update of each group it holds in the round as it masked it (trained - initial,
    clipped: field.py's clip_update), from its trained arrays (e.g. a plain run of the same seeds):
    the truth the estimates are compared with."""
    out = {}
    for node, arrays in trained.items():
        update = {k: np.asarray(v, dtype=np.float64) - initial[k] for k, v in arrays.items()}
        for group in config.groups.get(node, []):
            vector = group_vector(update, group, group_of)
            out[(node, group)] = clip_update(vector, config.clip_norm[group], config.value_range[group])
    return out


def fisher_z(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Fisher's z of the estimate's correlation with the truth, scaled to N(0, 1) under independence."""
    r = float(np.corrcoef(estimate, truth)[0, 1])
    return math.atanh(max(min(r, 0.999999), -0.999999)) * math.sqrt(truth.size - 3)


def looks_random(zs: Mapping[Any, float]) -> bool:
    """The estimates are no closer to the truths than random guesses: every |z| < Z_LIMIT and
    the squares' sum below chi-square's CHI2_QUANTILE (one degree of freedom per estimate)."""
    return all(abs(z) < Z_LIMIT for z in zs.values()) and sum(z * z for z in zs.values()) < stats.chi2.ppf(
        CHI2_QUANTILE, df=max(len(zs), 1)
    )


def _truths(path: Path) -> dict[tuple[int, str], np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {}
            for name in data.files:
                node, _, group = name.partition(".")
                if not node.isdigit() or not group:
                    raise ValueError(f"array {name!r}: expected <node>.<group>")
                out[(int(node), group)] = np.asarray(data[name], dtype=np.float64).ravel()
            return out
    except (OSError, ValueError) as err:
        raise TranscriptError(f"{path}: cannot read the truths ({err})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m secure_aggregation.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("transcript", type=Path, help="a run's transcript/ directory, or one round-<n>/ of it")
    parser.add_argument("--truth", type=Path, help="npz of <node>.<group> -> the site's clipped update")
    parser.add_argument(
        "--min-holders",
        type=int,
        default=DEFAULT_MIN_HOLDERS,
        help=f"the fewest holders a group may be opened over (default {DEFAULT_MIN_HOLDERS}, the sites' own floor)",
    )
    args = parser.parse_args(argv)
    if args.min_holders < 1:
        parser.error(f"--min-holders: value {args.min_holders}: must be at least 1")
    try:
        truths = _truths(args.truth) if args.truth else {}
        rounds = [read_secure_round(d) for d in round_dirs(args.transcript)]
        if truths and len(rounds) != 1:
            raise TranscriptError(f"{args.transcript}: --truth is one round's; name one round-<n> directory")
    except TranscriptError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    zs: dict[tuple[int, int, str], float] = {}
    problems: list[str] = []
    for header, transcript in rounds:
        estimates = attack(transcript)
        withheld = transcript.request.withheld if transcript.request is not None else {}
        print(f"round {header.round}: {len(estimates)} (site, group) segments; withheld: {sorted(withheld) or 'none'}")
        for problem in exposed(estimates, args.min_holders):
            problems.append(f"round {header.round}: {problem}")
            print(f"  EXPOSED: {problem}")
        for (node, group), estimate in sorted(estimates.items()):
            line = (
                f"  {header.sites.get(node, '?')} (node {node}) {group}: self-mask "
                f"{'removed' if estimate.self_mask_removed else 'kept'}, pairwise masks removed "
                f"{estimate.pair_masks_removed} of {estimate.pair_masks}"
            )
            truth = truths.get((node, group))
            if truth is not None and truth.size == estimate.values.size:
                z = zs[(header.round, node, group)] = fisher_z(estimate.values, truth)
                line += f"; correlation with the truth: Fisher z {z:+.2f}"
            print(line)
    verdict = True
    if zs:
        verdict = looks_random(zs)
        print(f"{len(zs)} estimates against the truth: {'no closer than random' if verdict else 'CLOSER THAN RANDOM'}")
    if problems:
        print(f"{len(problems)} exposure(s) below the floor of {args.min_holders} holders", file=sys.stderr)
    return 0 if verdict and not problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
