"""The federation-wide AUROC from what sites may release: per-class score histograms on the
server's grid with small cells merged (healthfm_core/eval/score_histogram.py), pooled by the
server (healthfm_core/eval/pooled_auroc.py, federation_auroc.py); the reply's checks on a peer's
histograms (healthfm_core/protocol/eval_reply.py); the run's summary.md and forest plot from a recorded evaluation
(server/runlog.py); loss panels only for objectives with data (eval/plots.py, compare.py)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from healthfm_core.eval.compare import loss_curves_plot
from healthfm_core.eval.federation_auroc import federation_aurocs
from healthfm_core.eval.plots import loss_panels, training_curves
from healthfm_core.eval.pooled_auroc import Cell, cells_of, pooled_auroc
from healthfm_core.eval.score_histogram import (
    BinnedScores,
    merge_small_cells,
    score_bin_edges,
    score_bin_index,
    score_histogram,
)
from healthfm_core.eval.site_histogram import release_histogram
from healthfm_core.protocol import SMALL_CELL, EvalReply, ScoreHistogram, SplitCount, TaskMetrics, TaskReason
from server.runlog import EVAL_PLOT, EventLog, write_summary


def _site_scores(rng: np.random.Generator, n: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    y = rng.random(n) < 0.15
    z = rng.normal(size=n) + 1.3 * y - 2.0 + shift
    return y, 1.0 / (1.0 + np.exp(-z))


# ---------------------------------------------------------------- the math against references


@pytest.mark.parametrize("scale", ["logit", "probability"])
def test_on_the_grid_the_pooled_auroc_is_sklearns(scale) -> None:
    """Scores already on the grid (one value per bin: every pair in a bin a true tie): the binned
    pooled AUROC equals sklearn's on all sites' rows, and the binning bound says how much the
    ties could hide."""
    rng = np.random.default_rng(1)
    n_bins = 30
    edges = score_bin_edges(n_bins, scale)
    mids = (edges[:-1] + edges[1:]) / 2
    cells, ys, ps = [], [], []
    for shift in (0.0, 0.4, -0.3):
        y, p = _site_scores(rng, 400, shift)
        p = mids[score_bin_index(p, n_bins, scale)]  # rounded onto the grid
        released = merge_small_cells(score_histogram(y, p, n_bins, scale), 1)
        assert released is not None
        cells += cells_of(*released)
        ys.append(y)
        ps.append(p)
    y, p = np.concatenate(ys), np.concatenate(ps)
    r = pooled_auroc(cells)
    assert r.auroc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert (r.positives, r.negatives) == (int(y.sum()), int((~y).sum()))


@pytest.mark.parametrize(("minimum", "limit"), [(1, 0.025), (10, 0.06), (20, 0.1)])
def test_the_binned_auroc_is_within_its_bound_of_the_exact_pooled_auroc(minimum, limit) -> None:
    """Continuous scores, sites merging their small cells each their own way: the exact AUROC
    over every site's rows lies within binning_bound of the binned one; at this size (4 sites of
    1,500 rows, ~15% positive) the default grid's bound is measured (docs/coordinator.md): 0.022
    unmerged, 0.049 merged to 10, 0.090 merged to 20."""
    rng = np.random.default_rng(2)
    cells, ys, ps = [], [], []
    for shift in (0.0, 0.5, -0.5, 0.2):
        y, p = _site_scores(rng, 1500, shift)
        released = merge_small_cells(score_histogram(y, p, 50, "logit"), minimum)
        assert released is not None
        cells += cells_of(*released)
        ys.append(y)
        ps.append(p)
    exact = roc_auc_score(np.concatenate(ys), np.concatenate(ps))
    r = pooled_auroc(cells)
    assert abs(r.auroc - exact) <= r.binning_bound
    assert r.binning_bound < limit
    assert r.low < r.auroc < r.high


def test_delong_variance_equals_a_pairwise_computation_on_the_rows() -> None:
    """The interval's variance against DeLong's placements computed row by row from the pairwise
    comparisons (ties one half), cells of different sites overlapping included."""
    cells = [Cell(0, 2, 3, 7), Cell(2, 5, 6, 4), Cell(5, 9, 9, 1), Cell(1, 4, 2, 5), Cell(4, 9, 5, 0)]
    lo = np.array([c.lo for c in cells for _ in range(int(c.positives))])
    hi = np.array([c.hi for c in cells for _ in range(int(c.positives))])
    nlo = np.array([c.lo for c in cells for _ in range(int(c.negatives))])
    nhi = np.array([c.hi for c in cells for _ in range(int(c.negatives))])
    k = np.full((len(lo), len(nlo)), 0.5)
    k[lo[:, None] >= nhi[None, :]] = 1.0
    k[hi[:, None] <= nlo[None, :]] = 0.0
    auc = k.mean()
    v10, v01 = k.mean(axis=1), k.mean(axis=0)
    var = v10.var(ddof=1) / len(lo) + v01.var(ddof=1) / len(nlo)
    r = pooled_auroc(cells)
    assert r.auroc == pytest.approx(auc, abs=1e-12)
    assert r.se**2 == pytest.approx(var, rel=1e-10)
    assert pooled_auroc(cells, design_effect=3.0).se ** 2 == pytest.approx(3 * var, rel=1e-10)
    assert r.binning_bound == pytest.approx(0.5 * (k == 0.5).mean(), abs=1e-12)


def test_one_class_pooled_is_an_error() -> None:
    with pytest.raises(ValueError, match="both classes"):
        pooled_auroc([Cell(0, 3, 5, 0)])


# ---------------------------------------------------------------- small cells


def test_merging_never_releases_a_small_cell_and_keeps_the_totals() -> None:
    rng = np.random.default_rng(3)
    for trial in range(400):
        n_bins, minimum = int(rng.integers(1, 25)), int(rng.integers(1, 12))
        pos = rng.poisson(rng.uniform(0, 6), n_bins) * (rng.random(n_bins) < 0.7)
        neg = rng.poisson(rng.uniform(0, 15), n_bins) * (rng.random(n_bins) < 0.8)
        hist = BinnedScores(list(range(n_bins + 1)), pos.tolist(), neg.tolist())
        merged = merge_small_cells(hist, minimum)
        small_total = 0 < pos.sum() < minimum or 0 < neg.sum() < minimum
        assert (merged is None) == small_total, trial
        if merged is None:
            continue
        assert merged.bounds[0] == 0 and merged.bounds[-1] == n_bins
        assert all(b > a for a, b in zip(merged.bounds, merged.bounds[1:]))
        assert not [c for c in merged.positives + merged.negatives if 0 < c < minimum], (trial, merged)
        for i, (a, b) in enumerate(zip(merged.bounds, merged.bounds[1:])):  # each cell is its bins' sum
            assert (merged.positives[i], merged.negatives[i]) == (pos[a:b].sum(), neg[a:b].sum())


def test_merging_loses_the_fewest_tied_pairs_of_any_allowed_merge() -> None:
    """Against every partition of a short grid into runs (brute force)."""
    rng = np.random.default_rng(4)
    for _ in range(60):
        n_bins, minimum = 7, int(rng.integers(2, 6))
        pos, neg = rng.integers(0, 6, n_bins), rng.integers(0, 8, n_bins)
        if 0 < pos.sum() < minimum or 0 < neg.sum() < minimum:
            continue
        best = None
        for cuts in itertools.product([False, True], repeat=n_bins - 1):
            bounds = [0, *[i + 1 for i, c in enumerate(cuts) if c], n_bins]
            cells = [(pos[a:b].sum(), neg[a:b].sum()) for a, b in zip(bounds, bounds[1:])]
            if any(0 < x < minimum for c in cells for x in c):
                continue
            tied = sum(int(p) * int(q) for p, q in cells)
            best = tied if best is None else min(best, tied)
        merged = merge_small_cells(BinnedScores(list(range(n_bins + 1)), pos.tolist(), neg.tolist()), minimum)
        assert merged is not None
        assert sum(p * q for p, q in zip(merged.positives, merged.negatives)) == best


def test_a_site_releases_no_histogram_of_a_class_below_its_minimum() -> None:
    rng = np.random.default_rng(5)
    p = rng.random(60)
    y = np.zeros(60, bool)
    y[:4] = True
    assert release_histogram(y, p, np.arange(60), 20, "logit", minimum=5) == "positives_below_minimum"
    assert release_histogram(~y, p, np.arange(60), 20, "logit", minimum=5) == "negatives_below_minimum"
    h = release_histogram(y, p, np.arange(60), 20, "logit", minimum=4)
    assert isinstance(h, ScoreHistogram) and sum(h.positives) == 4 and h.minimum == 4


def test_no_cell_holds_fewer_subjects_than_the_minimum_however_many_rows_they_have() -> None:
    # held_out scores every labelled row, so one subject can have dozens. Here subject 0 has 30
    # negative rows, all scored near 0.99, and 40 other subjects one row each near 0.2-0.45: merged
    # by rows alone (minimum 10) subject 0's rows would be a cell of their own.
    rng = np.random.default_rng(8)
    p = np.concatenate([np.full(30, 0.99), rng.uniform(0.2, 0.45, 40)])
    y = np.concatenate([np.zeros(30, bool), rng.random(40) < 0.5])
    subject = np.concatenate([np.zeros(30, int), np.arange(1, 41)])
    bins = score_bin_index(p, 50, "probability")
    by_rows = merge_small_cells(score_histogram(y, p, 50, "probability"), 10)
    assert by_rows is not None and by_rows.negatives[-1] >= 30
    last = bins >= by_rows.bounds[-2]
    assert len(np.unique(subject[last])) < 10  # the leak: a released cell of one or two subjects' rows
    h = release_histogram(y, p, subject, 50, "probability", minimum=10)
    assert isinstance(h, ScoreHistogram) and sum(h.negatives) + sum(h.positives) == 70
    for lo, hi in zip(h.bounds, h.bounds[1:]):
        inside = (bins >= lo) & (bins < hi)
        for cls in (True, False):
            n = len(np.unique(subject[inside & (y == cls)]))
            assert n == 0 or n >= 10, (lo, hi, cls, n)
    # Enough positive rows (12), too few positive subjects (2): no histogram leaves.
    y2 = np.zeros(70, bool)
    y2[:12] = True
    assert release_histogram(
        y2, p, np.concatenate([np.repeat([0, 1], 6), np.arange(2, 60)]), 50, "probability", 10
    ) == ("positives_below_minimum")


# ---------------------------------------------------------------- the reply: a peer's claims checked


def _reply_records() -> dict:
    reply = EvalReply(
        tasks={"t2d_365d": TaskMetrics(n=40, auroc=0.7, positives=15, auroc_low=0.55, auroc_high=0.82, subjects=20)},
        histograms={"t2d_365d": ScoreHistogram(bounds=[0, 10, 50], positives=[0, 15], negatives=[12, 13], minimum=10)},
    )
    flat = reply.to_records()
    assert EvalReply.from_records(flat, expected=["t2d_365d"], score_bins=50) == reply
    return flat


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"t2d_365d.histogram-positives": [0, 16]}, r"16 \+ 25 rows, but t2d_365d.n is 40"),  # lies about n
        ({"t2d_365d.histogram-positives": [2, 13]}, "below the minimum 10"),  # a small cell
        ({"t2d_365d.histogram-negatives": [13, 12], "t2d_365d.positives": 14}, "t2d_365d.positives is 14"),
        ({"t2d_365d.histogram-negatives": [12, -1]}, "negative count"),
        ({"t2d_365d.histogram-bounds": [0, 10, 10]}, "must start at 0 and increase"),
        ({"t2d_365d.histogram-bounds": [0, 50]}, "cells in bounds"),
        ({"t2d_365d.histogram-negatives": [12.0, 13.0]}, "histogram-negatives"),  # not counts
        ({"t2d_365d.histogram-withheld.positives_below_minimum": 1}, "both sent and withheld"),
        ({"t2d_365d.histogram-withheld.bored": 1}, "histogram-withheld.bored"),
    ],
)
def test_the_server_refuses_inconsistent_histograms(change, match) -> None:
    with pytest.raises(ValueError, match=match):
        EvalReply.from_records({**_reply_records(), **change}, score_bins=50)


def test_a_histogram_off_the_asked_grid_or_for_a_task_without_auroc_is_refused() -> None:
    flat = _reply_records()
    with pytest.raises(ValueError, match="the grid asked has 20 bins"):
        EvalReply.from_records(flat, score_bins=20)
    with pytest.raises(ValueError, match="the grid asked has 0 bins"):
        EvalReply.from_records(flat, score_bins=0)
    regression = {
        k: v for k, v in flat.items() if k not in ("t2d_365d.auroc", "t2d_365d.auroc-low", "t2d_365d.auroc-high")
    }
    with pytest.raises(ValueError, match="without an AUROC"):
        EvalReply.from_records({**regression, "t2d_365d.r2": 0.3})


# ---------------------------------------------------------------- the run's summary


def _recorded_evaluation(tmp_path: Path) -> tuple[Path, dict[str, EvalReply], list[Cell]]:
    """A recorded evaluate event: site a and b release histograms, c withholds its histogram
    (too few positives), d has no metric (too few subjects), e never replied, f (not asked) did
    not take the run's setup."""
    rng = np.random.default_rng(6)
    per_site: dict[str, EvalReply] = {}
    cells: list[Cell] = []
    for site, shift in (("a", 0.0), ("b", 0.6)):
        y, p = _site_scores(rng, 300, shift)
        h = release_histogram(y, p, np.arange(len(y)), 50, "logit", minimum=10)
        assert isinstance(h, ScoreHistogram)
        cells += cells_of(h.bounds, h.positives, h.negatives)
        auc = float(roc_auc_score(y, p))
        per_site[site] = EvalReply(
            tasks={
                "t2d_365d": TaskMetrics(
                    n=300,
                    auroc=auc,
                    auroc_low=auc - 0.1,
                    auroc_high=auc + 0.05,
                    positives=int(y.sum()),
                    subjects=150,
                )
            },
            histograms={"t2d_365d": h},
        )
    per_site["c"] = EvalReply(
        tasks={"t2d_365d": TaskMetrics(n=120, auroc=0.9, auroc_low=0.7, auroc_high=1.0, positives=SMALL_CELL)},
        histograms_withheld={"t2d_365d": "positives_below_minimum"},
    )
    few = SplitCount(rows=SMALL_CELL, subjects=SMALL_CELL, positives=0)
    per_site["d"] = EvalReply(
        reasons={"t2d_365d": TaskReason(kind="too_few_subjects", minimum=10, splits={"held_out": few})}, withheld=1
    )
    out = tmp_path / "run"
    EventLog(out / "rounds.jsonl").write(
        "evaluate",
        round=2,
        sites={s: r.to_records() for s, r in per_site.items()},
        aggregated={"t2d_365d.auroc": 0.75, "t2d_365d.n": 720},
        tasks=["t2d_365d"],
        binary_tasks=["t2d_365d"],
        asked_sites=["a", "b", "c", "d", "e"],
        absent={"e": "not connected to the SuperLink", "f": "did not accept the run's setup in round 0"},
        score_bins=50,
        score_scale="logit",
    )
    return out, per_site, cells


def test_the_summary_shows_every_site_its_reason_and_the_pooled_auroc(tmp_path: Path) -> None:
    out, per_site, cells = _recorded_evaluation(tmp_path)
    summary = write_summary(out).read_text()
    expected = pooled_auroc(cells, design_effect=600 / 300)  # rows per subject at a and b
    fed = summary.split("### Federation-wide AUROC per task")[1].split("###")[0]
    row = next(line for line in fed.splitlines() if line.startswith("| t2d_365d"))
    assert f"{expected.auroc:.3f} [{expected.low:.3f}, {expected.high:.3f}]" in row
    assert "| 2 of 6 | 600 |" in row and f"{expected.binning_bound:.3f}" in row
    assert "c: histogram withheld: fewer held-out positives than the site's minimum" in row
    assert "d: no metric: too few subjects (minimum 10 subjects per split, min_report_subjects" in row
    assert "e: no evaluation reply from this site: not connected to the SuperLink" in row
    assert "f: no evaluation reply from this site: did not accept the run's setup in round 0" in row
    per = summary.split("### Per site and task")[1]
    rows = [line for line in per.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| a", "| b", "| c", "| d", "| e", "| f"]  # nobody dropped
    assert rows[2].split(" | ")[2:4] == ["120", "<min"]
    assert "too few subjects" in rows[3] and "no reply from this site: not connected to the SuperLink" in rows[4]
    a = per_site["a"].tasks["t2d_365d"]
    assert f"{a.n} | {a.positives} | AUROC {a.auroc:.3f} [{a.auroc_low:.3f}, {a.auroc_high:.3f}]" in rows[0]
    assert "Binning costs more than 0.05 AUROC for t2d_365d" in summary  # 300 rows a site, merged to 10
    assert (out / EVAL_PLOT).stat().st_size > 0 and f"]({EVAL_PLOT})" in summary


def test_pooling_is_the_same_from_the_recorded_replies_and_json(tmp_path: Path) -> None:
    """evaluation.json's form (the flat replies as JSON) pools to the same value as the replies."""
    _, per_site, _ = _recorded_evaluation(tmp_path)
    flat = json.loads(json.dumps({s: r.to_records() for s, r in per_site.items()}))
    again = {s: EvalReply.from_records(f) for s, f in flat.items()}
    assert federation_aurocs(["t2d_365d"], again) == federation_aurocs(["t2d_365d"], per_site)


def test_a_histogram_merged_into_one_cell_pools_to_no_number() -> None:
    """A site whose minimum merged every score into one cell ranks nothing: the pooled AUROC
    would be 0.5 by construction, so it is reported as none, with the reason (the mimic
    nine-task run's readmission at 116 held-out rows, 29 positives, minimum 20)."""
    h = ScoreHistogram(bounds=[0, 50], positives=[29], negatives=[87], minimum=20)
    reply = EvalReply(
        tasks={"t": TaskMetrics(n=116, auroc=0.6, auroc_low=0.5, auroc_high=0.7, positives=29)},
        histograms={"t": h},
    )
    pooled = federation_aurocs(["t"], {"a": reply})["t"]
    assert pooled.auroc is None and pooled.sites == ["a"] and "one cell" in pooled.note
    assert pooled.binning_bound == pytest.approx(0.5)


# ---------------------------------------------------------------- plots: only panels with data


def test_an_ehr_only_history_draws_only_the_losses_it_has(tmp_path: Path) -> None:
    history = [
        {"step": i, "total": 2.0 - i / 10, "masked_ehr": 1.0 - i / 20, "masked_wearables": 0.0, "alignment": 0.0}
        for i in range(12)
    ]
    assert loss_panels(history) == ["masked_ehr", "total"]
    assert training_curves(history, tmp_path / "curves.png").stat().st_size > 0
    curves = {"federated": [{"progress": i / 4, "masked_ehr": 1.0, "masked_wearables": 0.0} for i in range(4)]}
    assert loss_curves_plot(curves, tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.slow  # a Monte Carlo of 150 federations (~25 s on 2 busy cores): CI's slow stage (SLOW_CI)
def test_the_interval_covers_the_pooled_auroc_when_subjects_have_several_rows() -> None:
    """4 rows per subject sharing the subject's label and most of its score: DeLong alone (rows
    as independent) covers the population AUROC far less than 95% of the time; with the design
    effect (rows per subject) the federation's interval covers it about 95% of the time."""
    rng = np.random.default_rng(7)
    shifts = (0.0, 0.5, -0.5, 0.2)

    def sites(subjects: int, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
        out = []
        for shift in shifts:
            label = rng.random(subjects) < 0.15
            y, u = np.repeat(label, rows), np.repeat(rng.normal(size=subjects), rows)
            z = 0.9 * u + 0.45 * rng.normal(size=subjects * rows) + 1.3 * y - 2.0 + shift
            out.append((y, 1.0 / (1.0 + np.exp(-z))))
        return out

    population = sites(100_000, 1)
    truth = roc_auc_score(np.concatenate([y for y, _ in population]), np.concatenate([p for _, p in population]))
    covered = {1.0: 0, 4.0: 0}
    runs = 150
    for _ in range(runs):
        cells = []
        for y, p in sites(300, 4):
            released = merge_small_cells(score_histogram(y, p, 200, "logit"), 1)
            assert released is not None
            cells += cells_of(*released)
        for deff in covered:
            r = pooled_auroc(cells, design_effect=deff)
            covered[deff] += r.low <= truth <= r.high
    assert covered[1.0] / runs < 0.85
    assert 0.9 <= covered[4.0] / runs <= 0.99
