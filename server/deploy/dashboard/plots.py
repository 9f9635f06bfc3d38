"""The page's plots as SVG, drawn on the server with matplotlib (no JavaScript, nothing fetched):
each DP site's cumulative epsilon over its rounds, and a run's AUROC forest plot (the one
summary.md draws, healthfm_core.eval.plots.auroc_forest_figure)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.ticker import MaxNLocator

from healthfm_core.eval.plots import IntervalPoint, auroc_forest_figure, plt
from server.deploy.dashboard.view import PrivacyView


def svg(fig: plt.Figure) -> bytes:
    """The figure as SVG text, closed after."""
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="svg", bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()


def epsilon_svg(privacy: Sequence[PrivacyView]) -> bytes:
    """One line per DP site: its cumulative epsilon after each round it trained under DP (round
    markers: pretraining o, task head s), in the order the rounds ended; each site's cap (its
    policy's, as it reported it) dashed in the site's colour; the server's target epsilon dashed
    in grey where it asked for one."""
    fig, ax = plt.subplots(figsize=(7, 3.2))
    target = next((p.target_epsilon for p in privacy if p.target_epsilon is not None), None)
    for i, view in enumerate(privacy):
        xs = [p.number or i for i, p in enumerate(view.points, 1)]  # a long curve's points are thinned
        ax.plot(xs, [p.epsilon for p in view.points], color=f"C{i % 10}", label=view.site, linewidth=1.5)
        for x, p in zip(xs, view.points):
            ax.plot([x], [p.epsilon], marker="o" if p.kind == "pretraining" else "s", color=f"C{i % 10}", markersize=5)
        if view.epsilon_cap is not None:
            ax.axhline(
                view.epsilon_cap, color=f"C{i % 10}", linestyle="--", linewidth=1,
                label=f"{view.site}'s cap ({view.epsilon_cap:g})",
            )  # fmt: skip
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"server's target per run ({target:g})")
    if not privacy:
        ax.text(0.5, 0.5, "no site has trained under DP", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("DP rounds at the site, in order (o pretraining, s task head)")
    ax.set_ylabel("cumulative epsilon")
    caps = [v.epsilon_cap for v in privacy if v.epsilon_cap is not None]
    top = max([p.epsilon for v in privacy for p in v.points] + caps + [target or 0.0, 1e-9])
    ax.set_ylim(0, top * 1.12)  # the last point clear of the frame
    longest = max((max(v.dp_rounds, len(v.points)) for v in privacy), default=1)
    ax.set_xlim(0.5, longest + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    if privacy or target is not None:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return svg(fig)


def forest_svg(points: Sequence[IntervalPoint], title: str) -> bytes:
    return svg(auroc_forest_figure(points, title))
