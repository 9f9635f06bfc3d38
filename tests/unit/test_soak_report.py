"""docs/performance.md's soak figures come from the soak's JSON (benchmarks/soak_report.py): the
summary row and the block between the markers are rewritten, the prose around them kept; each
judged process's figures and each kind of file with its retention appear; a page without the
markers is refused, not half-written."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "benchmarks"))  # after the repository
import soak_report  # noqa: E402
import soak_watch  # noqa: E402

MIB = 1024  # KiB


def _result() -> dict[str, Any]:
    ticks = {t: soak_watch.Peak((400 + t % 3) * MIB, (100 + (t == 150) * 5) * MIB, 12, 4) for t in range(0, 201)}
    series = soak_watch.Series({"biobank/clientapp/7": ticks})
    verdicts = soak_watch.judge_series(series, 20, 10, 0.10, 200)
    sizes = {
        t: {
            "run-main/rounds.jsonl": 1000 * t,
            "fed/server/nginx-access.log": 100 * (t % 50),
            "run-main/checkpoints/step-00000200/arrays.npz": 5000,
        }
        for t in range(0, 201)
    }
    disk = soak_watch.judge_disk(sizes, 20, 200, 256 * 1024, 3, 2)
    criteria = {"rss": {"pass": True, "detail": "fine"}, "epsilon": {"pass": True, "detail": "ledger 1.5, page 1.500"}}
    return {
        "config": {k: 1 for k in ("eval_every", "local_steps", "subjects", "site_restart", "superlink_restart")}
        | {"rounds": 200, "runs": 20, "dp_site": "genomics"},
        "machine": {"date": "2026-11-29", "commit": "abc1234", "cores": 2, "python": "3.11.7"},
        "timeline": [{"tick": 60, "what": "genomics killed"}],
        "criteria": criteria,
        "processes": [soak_watch.as_dict(v) for v in verdicts],
        "series": series.to_json(),
        "pages": {"200": {"/": [40.0, 20.0]}},
        "page_times": {"/": {"first": 50.0, "cached": 21.5, "in_flight_median": 45.0, "in_flight_max": 60.0}},
        "load_by_tick": {"1": 3.0, "2": 5.0},
        "disk": {
            "records_bytes_per_round": disk.records,
            "logs_bytes_per_round": disk.logs,
            "unexpected_bytes_per_round": disk.unexpected,
            "last": sizes[200],
        },
        "wall_s": 600.0,
    }


def test_the_figures_are_rewritten_between_the_markers_and_the_prose_kept(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text(
        "| benchmark | x |\n|---|---|\n| [a soak](#a-soak) | old row |\n\n## A soak\n\nprose stays\n\n"
        f"{soak_report.BEGIN}\nold figures\n{soak_report.END}\n\nafter stays\n"
    )
    soak_report.rewrite(doc, _result(), None)
    text = doc.read_text()
    assert "old row" not in text and "old figures" not in text
    assert "prose stays" in text and text.endswith("after stays\n")
    row = next(line for line in text.splitlines() if line.startswith(soak_report.ROW))
    assert (
        "rss pass, epsilon pass" in row
        and "x1.050 of its reference round" in row
        and "50 ms first, 21.5 ms cached" in row
    )
    # The process at round 20 (100 MiB), at round 200 (100) and its most after (105 at tick 150).
    assert (
        "| clientapp | 1 | 100.0-100.0 | x1.050 (biobank/clientapp/7 at tick 150) | 12 -> 12 | 4 -> 4 | pass |" in text
    )
    assert "| rounds.jsonl | 1 | 200,000 | 200,000 | 1,000 | kept whole" in text
    assert "| logs | 1 |" in text and "3 backups kept" in text
    assert "| checkpoints | 1 | 5,000 |" in text
    assert "load while it ran: 1-minute load average 3.0-5.0" in text
    assert "Epsilon: genomics: ledger 1.5, page 1.500." in text


def test_a_page_without_the_markers_is_refused_untouched(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text("| [a soak](#a-soak) | old row |\n")
    with pytest.raises(SystemExit, match="no <!-- soak figures: begin -->"):
        soak_report.rewrite(doc, _result(), None)
    assert doc.read_text() == "| [a soak](#a-soak) | old row |\n"
