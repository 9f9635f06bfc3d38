"""The dashboard over a run of thousands of rounds (issue 69, the soak): what it holds per run is
bounded by its named constants, not by the rounds recorded, while every figure of the page equals
the one computed from the whole file (server.runlog.read_events) as the page computed it before
it folded the file (the reference below); and a run within the held window is shown exactly as
before, every round view and every epsilon point."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from helpers.dashboard_fed import (
    RECORDED,
    dashboard,
    launch_recorded,
    provisioned,
    recorded_events,
    row,
    samples,
    section,
)

from server.deploy.commands import read_launches
from server.deploy.dashboard.files import RunFiles
from server.deploy.dashboard.view import (
    EVALUATIONS_KEPT,
    PLOT_POINTS,
    REFUSALS_SHOWN,
    ROUNDS_KEPT,
    ROUNDS_SHOWN,
    FederationView,
    Launch,
    RoundView,
    SiteLatest,
    _FilePrivacy,
    _RoundsFold,
    evaluation_view,
    federation_view,
    round_view,
)
from server.deploy.provision import FederationPaths
from server.runlog import read_events

RUN = 7
DP_SITE = "genomics"


def reference_run(events: list[dict[str, Any]], run_id: int) -> dict[str, Any]:
    """The runs panel's figures of `run_id` from every event, as the dashboard computed them when
    it held the whole file (main at 27348cb, view.py _run_view)."""
    starts = [i for i, e in enumerate(events) if e.get("event") in ("setup", "resume") and e.get("run_id") is not None]
    mine = [i for i in starts if events[i].get("run_id") == run_id]
    begin = mine[0]
    later = [i for i in starts if i > begin and events[i].get("run_id") != run_id]
    end = later[0] if later else len(events)
    rounds: dict[int, RoundView] = {}
    refused_setup: dict[str, str] = {}
    for event in events[begin:end]:
        if event.get("event") == "round":
            view = round_view(event)
            rounds[view.round] = view
        elif event.get("event") in ("setup", "resume"):
            refused_setup.update({str(s): str(r) for s, r in (event.get("refused") or {}).items()})
    ordered = [rounds[r] for r in sorted(rounds)]
    out: dict[str, Any] = {
        "rounds": ordered[-ROUNDS_SHOWN:], "recorded": len(ordered), "refused_setup": refused_setup,
        "bytes_sent": sum(r.bytes_sent for r in ordered), "bytes_received": sum(r.bytes_received for r in ordered),
        "state_counts": {}, "latest": {}, "trained_last": {}, "refusals": {},
        "planned": max((int(e.get("rounds") or 0) for e in events if e.get("event") == "round"), default=0),
    }  # fmt: skip
    for rnd in ordered:
        for name, entry in rnd.sites.items():
            counts = out["state_counts"].setdefault(name, {})
            counts[entry.state] = counts.get(entry.state, 0) + 1
            out["latest"][name] = SiteLatest(run_id, rnd.round, entry.state, entry.reason)
            if entry.state == "ok":
                out["trained_last"][name] = rnd.round
            elif entry.state in ("refusing", "rejected"):
                said = f"run {run_id} round {rnd.round}: {entry.state}: {entry.reason}"
                out["refusals"].setdefault(name, []).append(said)
    return out


def reference_epsilon(events: list[dict[str, Any]], run_id: int) -> tuple[list[tuple[float, float, str]], list[str]]:
    """The DP site's (time, epsilon, label) after each round it trained under DP, and the rounds it
    refused, from every event (as privacy_views read them)."""
    points, refused = [], []
    for event in events:
        entry = (event.get("sites") or {}).get(DP_SITE) if event.get("event") == "round" else None
        if entry and (entry.get("dp") or {}).get("epsilon") is not None:
            label = f"run {run_id} round {event['round']}"
            if entry.get("status") == "refused":
                refused.append(label)
            else:
                points.append((event["time"], entry["dp"]["epsilon"], label))
    return points, refused


def assert_run_as_reference(view: FederationView, out: Path, run_id: int) -> None:
    events = read_events(out / "rounds.jsonl")
    [run] = [r for r in view.runs if r.launch.run_id == run_id]
    want = reference_run(events, run_id)
    assert run.rounds == want["rounds"]
    assert (run.rounds_recorded, run.bytes_sent, run.bytes_received) == (
        want["recorded"], want["bytes_sent"], want["bytes_received"],
    )  # fmt: skip
    assert run.state_counts == want["state_counts"] and run.latest == want["latest"]
    assert run.trained_last == want["trained_last"] and run.refused_setup == want["refused_setup"]
    assert run.rounds_planned == want["planned"] or run.rounds_planned == run.rounds_done
    for site, said in want["refusals"].items():
        assert run.refusals[site] == said[-REFUSALS_SHOWN:]
        assert run.refusals_before.get(site, 0) == len(said) - len(run.refusals[site])
    assert set(run.refusals) == set(want["refusals"])
    absent = {e["round"]: e.get("absent") or {} for e in events if e.get("event") == "evaluate"}
    assert repr(run.evaluation) == repr(evaluation_view(out, absent))  # repr: a site without a metric is nan


def long_round(template: dict[str, Any], rnd: int, rounds: int, epsilon: float, salt: int = 0) -> dict[str, Any]:
    """The recorded round 2 (hospital lost, genomics under DP) as round `rnd`: genomics refuses
    every 7th round at its cap, hospital is lost every 5th and rejected every 11th."""
    event = copy.deepcopy(template)
    event.update(round=rnd, rounds=rounds, time=1.8e9 + rnd + salt / 100, bytes_sent=1000 + rnd + salt)
    event["bytes_received"] = 500 + 3 * rnd
    hospital = event["sites"]["hospital"]
    if rnd % 11 == 0:
        hospital.update(status="rejected", reason=f"norm {rnd} above the bound")
    elif rnd % 5 == 0:
        hospital.update(status="no reply", reason="keys: no reply within timeout-s 30 s")
    else:
        hospital.update(status="ok", reason=None)
    dp = event["sites"][DP_SITE]
    dp["status"] = "refused" if rnd % 7 == 0 else "ok"
    dp["reason"] = "epsilon cap 40 reached" if rnd % 7 == 0 else None
    dp["dp"] = {**dp["dp"], "epsilon": epsilon}
    return event


def write_rounds(out: Path, events: list[dict[str, Any]]) -> None:
    with open(out / "rounds.jsonl", "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(e) + "\n" for e in events))


def held_is_bounded(files: RunFiles) -> int:
    """The rounds and epsilon points `files` holds, each fold within its bound; their count."""
    held = 0
    for grown in files._grown.values():
        assert not isinstance(grown.value, list)  # no file held as its events
        if isinstance(grown.value, _RoundsFold):
            for part in grown.value.runs.values():
                assert len(part.window) <= ROUNDS_KEPT
                held += len(part.window)
            assert len(grown.value.absent) <= EVALUATIONS_KEPT
        if isinstance(grown.value, _FilePrivacy):
            for curve in grown.value.points.values():
                assert len(curve.kept) <= PLOT_POINTS
                held += len(curve.kept)
    return held


@pytest.fixture
def fed(tmp_path: Path) -> FederationPaths:
    return provisioned(tmp_path / "fed")


def launches(paths: FederationPaths) -> list[Launch]:
    return [Launch(r.run_id, Path(r.out_dir), r.launched_at, r.resumed) for r in read_launches(paths)]


def test_a_run_of_5000_rounds_is_held_bounded_and_shown_as_a_whole_read_shows_it(
    fed: FederationPaths, tmp_path: Path
) -> None:
    out = launch_recorded(fed, RUN, tmp_path / "runs" / "long", edit=lambda e: e if e["event"] == "setup" else None)
    template = next(e for e in recorded_events() if e["event"] == "round" and e["round"] == 2)
    evaluation = json.loads((RECORDED / "evaluation.json").read_text())
    files = RunFiles()
    epsilon, total = 0.0, 5000

    def rounds(first: int, last: int, salt: int = 0) -> list[dict[str, Any]]:
        nonlocal epsilon
        made = []
        for rnd in range(first, last + 1):
            epsilon += 0.0 if rnd % 7 == 0 else 0.01
            made.append(long_round(template, rnd, total, round(epsilon, 6), salt))
        return made

    def page() -> FederationView:
        view = federation_view(fed.root, launches(fed), lambda _: "", files=files)
        assert_run_as_reference(view, out, RUN)
        points, refused = reference_epsilon(read_events(out / "rounds.jsonl"), RUN)
        [privacy] = view.privacy
        assert (privacy.dp_rounds, privacy.refused_count, privacy.refused) == (len(points), len(refused), refused[-1:])
        assert (privacy.points[-1].epsilon, privacy.points[-1].label) == points[-1][1:]
        assert privacy.points[-1].number == len(points) and len(privacy.points) <= PLOT_POINTS + 1
        for p in privacy.points:  # each one plotted where the whole curve has it
            assert (p.time, p.epsilon, p.label) == points[p.number - 1]
        assert [p.number for p in privacy.points] == sorted({p.number for p in privacy.points})
        return view

    write_rounds(out, rounds(1, 1000))
    page()
    # A resume of the same run recording its last 10 rounds again (within the window).
    write_rounds(out, [{"event": "resume", "time": 1.8e9 + 3000.5, "run_id": RUN, "refused": {"biobank": "busy"}}])
    write_rounds(out, rounds(1001, 3000) + rounds(2991, 3000, salt=1) + rounds(3001, 4200))
    page()
    # Then one from a checkpoint 200 rounds back (before the window): the file is folded anew.
    write_rounds(out, rounds(4001, 4900, salt=2) + rounds(4901, total))
    write_rounds(out, [{"event": "evaluate", "time": 1.8e9 + total + 0.5, "round": total, "absent": {"hospital": "x"}}])
    (out / "evaluation.json").write_text(json.dumps({**evaluation, "round": total}))
    view = page()
    assert view.runs[0].rounds_recorded == total and view.runs[0].evaluation is not None
    assert view.runs[0].rounds[-1].round == total and view.runs[0].rounds[-1].bytes_sent == 1000 + total
    assert held_is_bounded(files) <= ROUNDS_KEPT + PLOT_POINTS

    # The page and /metrics say what the whole file says.
    points, refused = reference_epsilon(read_events(out / "rounds.jsonl"), RUN)
    client = dashboard(fed)
    html = client.get("/").text
    dp_row = row(section(html, "privacy"), "data-site", DP_SITE)
    assert (
        f'<td class="num dp-rounds">{len(points)}</td>' in dp_row and f"{len(refused)} (last: {refused[-1]})" in dp_row
    )
    assert f'<td class="last">{points[-1][2]}</td>' in dp_row
    metrics = samples(client.get("/metrics").text)
    assert metrics[("healthfm_site_dp_rounds", (("site", DP_SITE),))] == len(points)
    assert metrics[("healthfm_site_epsilon", (("site", DP_SITE),))] == points[-1][1]
    assert client.get("/plots/epsilon.svg").headers["content-type"].startswith("image/svg+xml")


def recorded_privacy(events: list[dict[str, Any]], run_id: int) -> list[tuple[float, float, str, int]]:
    points, _ = reference_epsilon(events, run_id)
    return [(t, e, label, i) for i, (t, e, label) in enumerate(points, 1)]


def test_runs_within_the_window_are_shown_as_before(fed: FederationPaths, tmp_path: Path) -> None:
    """The recorded run, and a run of ROUNDS_KEPT rounds beside it: every round view, total and
    epsilon point as computed from the whole files."""
    recorded = launch_recorded(fed, 3, tmp_path / "runs" / "recorded")
    out = launch_recorded(fed, RUN, tmp_path / "runs" / "window", edit=lambda e: e if e["event"] == "setup" else None)
    template = next(e for e in recorded_events() if e["event"] == "round" and e["round"] == 2)
    write_rounds(out, [long_round(template, rnd, ROUNDS_KEPT, 0.01 * rnd) for rnd in range(1, ROUNDS_KEPT + 1)])
    view = federation_view(fed.root, launches(fed), lambda _: "", files=RunFiles())
    assert_run_as_reference(view, recorded, 3)
    assert_run_as_reference(view, out, RUN)
    [privacy] = view.privacy
    want = sorted(
        recorded_privacy(read_events(recorded / "rounds.jsonl"), 3)
        + recorded_privacy(read_events(out / "rounds.jsonl"), RUN),
        key=lambda p: p[0],
    )
    assert [(p.time, p.epsilon, p.label) for p in privacy.points] == [w[:3] for w in want]
    assert [p.number for p in privacy.points] == list(range(1, len(want) + 1))
