"""The evidence of one (scenario, seed) unit of the evidence job: collected, written to the unit's
folder when the unit ends, read back, and merged into the job's evidence.

    units/<scenario>-seed<seed>/evidence.npz         the items' (y, p_a, p_b, subject) arrays and
                                                     the calibration arrays
    units/<scenario>-seed<seed>/evidence_unit.json   everything else, the unit's config fingerprint
                                                     and the npz's sha256; written last: the unit
                                                     is done once it exists

No pickle anywhere (a run directory can be handed over: loading it must not run code): the
arrays are read with allow_pickle=False, the JSON through a pydantic model. The job merges what
it read back, never what it held in memory, so a resumed job and an uninterrupted one build
their report from the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, ValidationError

from healthfm_core.eval.metrics import auroc
from healthfm_core.eval.paired_comparison import (
    Comparison,
    Item,
    RowSetItem,
    compare_draws,
    compare_paired,
    compare_row_sets,
    with_prefix,
)
from healthfm_core.files import atomic_write_bytes, atomic_write_text
from healthfm_core.strict_files import StrictFileError, strict_model

ARRAYS = "evidence.npz"
DONE = "evidence_unit.json"  # written last: the unit's done-marker
FORMAT = 1
# Keys that change where or how fast a unit runs, or only the report drawn from the units (the
# job's lists of scenarios and seeds: a unit is its own scenario and seed; the time model; the
# targets; the pooled comparisons' resamples): a unit finished under other values still holds.
NOT_FINGERPRINTED: tuple[str, ...] = (
    "out_dir",
    "progress",
    "threads",
    "resume",
    "data_root",
    "data_dir",
    "preset_name",
)
NOT_FINGERPRINTED += ("scenarios", "seeds", "cost", "targets", "eval.n_boot")
# The federated evaluation's subject budget: the job's federations run no federated evaluation
# (federation.eval_tasks: []), so it changes none of a unit's numbers (units written before it existed resume).
NOT_FINGERPRINTED += ("federation.eval_max_subjects",)


ROW_SET_ARRAYS = ("ya", "pa", "ga", "yb", "pb", "gb")  # a row-set item's arrays, in RowSetItem order

# A comparison of one of k independent draws (q4's DP noise draws): "<head> draw <i> - <b>[ draw <i>]".
# Evidence.compare also gives "<head> - <b>" over all the draws (compare_draws).
DRAW_KEY = re.compile(r"^(?P<head>.+?) draw (?P<draw>\d+)(?P<rest> - .+?)(?: draw \d+)?$")


class UnitFileError(ValueError):
    """A unit's evidence file that cannot be read as one (names the file and the field)."""


class UnitConfigMismatch(UnitFileError):
    """A finished unit whose config differs from the job's (resume=true with changed settings)."""


class Evidence:
    """Per (scenario, comparison): the items pooled over seeds (subjects keyed by run), which
    methods they compare, and each seed's own point difference; plus the calibration data, the
    summary rows and the notes each unit leaves."""

    def __init__(self) -> None:
        self.items: dict[tuple[str, str], list[Item]] = defaultdict(list)
        # Comparisons whose two methods score rows of their own (compare_row_sets: the repeated-
        # event pitfall's two label definitions); their methods and per-seed points as items'.
        self.row_sets: dict[tuple[str, str], list[RowSetItem]] = defaultdict(list)
        self.methods: dict[tuple[str, str], tuple[str, str]] = {}
        self.per_seed: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
        self.calibration: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = defaultdict(list)
        self.summaries: dict[str, dict[int, list[dict]]] = defaultdict(dict)  # scenario -> seed -> rows
        self.curves: dict[str, dict[str, dict[float, list[float]]]] = {}  # scenario -> method -> share -> per seed
        self.privacy: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        # Per scenario and seed: a stage's own numbers that are not paired items (the genomics
        # diagnosis's R^2 and counts; the privacy draws' per-draw summaries).
        self.diagnostics: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
        self.notes: dict[str, list[str]] = defaultdict(list)

    def add(self, scenario: str, key: str, a: str, b: str, seed: int, items: Sequence[Item]) -> None:
        # A task whose held-out rows hold one class has no AUROC: it cannot enter a mean.
        items = [it for it in items if 0 < int(np.sum(it[0])) < len(it[0])]
        if not items:
            self.notes[scenario].append(f"seed {seed}: {key}: no task had both {a} and {b} scored")
            return
        self.items[(scenario, key)] += with_prefix(items, f"{scenario}|{seed}|")
        self.methods[(scenario, key)] = (a, b)
        self.per_seed[(scenario, key)][seed] = float(np.mean([auroc(y, pa_) - auroc(y, pb) for y, pa_, pb, _ in items]))

    def add_row_sets(self, scenario: str, key: str, a: str, b: str, seed: int, items: Sequence[RowSetItem]) -> None:
        """add() for items whose methods score rows of their own (each side needs both classes)."""
        items = [it for it in items if 0 < int(np.sum(it[0])) < len(it[0]) and 0 < int(np.sum(it[3])) < len(it[3])]
        if not items:
            self.notes[scenario].append(f"seed {seed}: {key}: no task had both {a} and {b} scored")
            return
        run = f"{scenario}|{seed}|"  # as with_prefix keys an item's subjects: runs never share one
        self.row_sets[(scenario, key)] += [
            (
                ya,
                pa_,
                np.char.add(run, np.asarray(ga).astype(str)),
                yb,
                pb,
                np.char.add(run, np.asarray(gb).astype(str)),
            )
            for ya, pa_, ga, yb, pb, gb in items
        ]
        self.methods[(scenario, key)] = (a, b)
        self.per_seed[(scenario, key)][seed] = float(
            np.mean([auroc(ya, pa_) - auroc(yb, pb) for ya, pa_, _, yb, pb, _ in items])
        )

    def merge(self, other: Evidence) -> None:
        """Append `other` (a later unit): merging the units in the job's order gives what one
        Evidence filled by all of them in that order holds, key order and item order included."""
        for k, items in other.items.items():
            self.items[k] += items
        for k, sets in other.row_sets.items():
            self.row_sets[k] += sets
        self.methods.update(other.methods)
        for k, seeds in other.per_seed.items():
            self.per_seed[k].update(seeds)
        for c, parts in other.calibration.items():
            self.calibration[c] += parts
        for s, rows in other.summaries.items():
            self.summaries[s].update(rows)
        for s, methods in other.curves.items():
            mine = self.curves.setdefault(s, {})
            for m, shares in methods.items():
                dst = mine.setdefault(m, {})
                for share, values in shares.items():
                    dst.setdefault(share, []).extend(values)
        for s, runs in other.privacy.items():
            self.privacy[s].update(runs)
        for s, runs in other.diagnostics.items():
            self.diagnostics[s].update(runs)
        for s, notes in other.notes.items():
            self.notes[s] += notes

    def compare(self, n_boot: int) -> dict[tuple[str, str], Comparison]:
        """Every key's paired comparison; and for keys of independent draws (DRAW_KEY), the
        comparison over all of a setting's draws, whose interval covers draws and subjects."""
        out = {k: compare_paired(items, *self.methods[k], n_boot=n_boot) for k, items in self.items.items()}
        out.update({k: compare_row_sets(sets, *self.methods[k], n_boot=n_boot) for k, sets in self.row_sets.items()})
        draws: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
        for scenario, key in self.items:
            if (m := DRAW_KEY.match(key)) is not None:
                draws[(scenario, m["head"] + m["rest"])].append((scenario, key))
        for (scenario, key), keys in draws.items():
            m = DRAW_KEY.match(keys[0][1])
            assert m is not None
            a = m["head"].split("|", 1)[1]
            b = m["rest"][3:]
            out[(scenario, key)] = compare_draws([self.items[k] for k in keys], a, b, n_boot=n_boot)
        return out


# ---------------------------------------------------------------- the unit file


class _Model(BaseModel):
    # NaN stays NaN (an AUROC that could not be estimated), not null.
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class ItemsEntry(_Model):
    scenario: str
    key: str
    n_items: int  # arrays i<index>_<j>_{y,pa,pb,groups} in the npz


class MethodsEntry(_Model):
    scenario: str
    key: str
    a: str
    b: str


class PerSeedEntry(_Model):
    scenario: str
    key: str
    seeds: dict[int, float]


class CalibrationEntry(_Model):
    scenario: str
    horizon: int
    n_parts: int  # arrays c<index>_<j>_{y,p,groups} in the npz


class Marker(_Model):
    """A file the job writes when a piece of it has finished (read back by read_marker)."""

    format: int


M = TypeVar("M", bound=Marker)


class UnitFile(Marker):
    """evidence_unit.json: the unit's evidence other than arrays, in insertion order."""

    scenario: str
    seed: int
    fingerprint: dict[str, Any]
    npz_sha256: str
    stage_seconds: dict[str, float]
    items: list[ItemsEntry]
    methods: list[MethodsEntry]
    per_seed: list[PerSeedEntry]
    calibration: list[CalibrationEntry]
    summaries: dict[str, dict[int, list[dict[str, Any]]]]
    curves: dict[str, dict[str, dict[float, list[float]]]]
    privacy: dict[str, dict[int, dict[str, Any]]]
    notes: dict[str, list[str]]
    # Absent in units written before the genomics diagnosis existed: empty.
    diagnostics: dict[str, dict[int, dict[str, Any]]] = {}
    # Absent in units written before issue 72's row-set comparisons: none (arrays r<index>_<j>_*).
    row_sets: list[ItemsEntry] = []


def unit_fingerprint(ucfg: DictConfig, scenario: str) -> dict[str, Any]:
    """The unit's resolved config without the keys of NOT_FINGERPRINTED, with the privacy
    budget's scenario and seed lists reduced to whether this unit runs the privacy federations;
    JSON-normalised so that it compares equal to its own round trip."""
    cfg = OmegaConf.to_container(ucfg, resolve=True)
    assert isinstance(cfg, dict)
    for key in NOT_FINGERPRINTED:
        *parents, leaf = key.split(".")
        node: Any = cfg
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    dp = cfg.get("privacy_budget")
    if isinstance(dp, dict):
        scenarios, seeds = dp.pop("scenarios", []), dp.pop("seeds", [])
        dp["runs_here"] = scenario in scenarios and cfg.get("seed") in seeds
    return json.loads(json.dumps(cfg))


def _difference(a: Any, b: Any, path: str = "") -> str | None:
    """The dotted path of the first place a and b differ (None: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}{k}"
            if (d := _difference(a[k], b[k], f"{path}{k}.")) is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := _difference(x, y, f"{path}{i}.")) is not None:
                return d
        return None
    return None if a == b else path.rstrip(".")


def _get(cfg: Mapping[str, Any], path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return "(absent)"
    return node


def _arrays(
    ev: Evidence,
) -> tuple[dict[str, np.ndarray], list[ItemsEntry], list[CalibrationEntry], list[ItemsEntry]]:
    arrays: dict[str, np.ndarray] = {}
    items = []
    for i, ((scenario, key), its) in enumerate(ev.items.items()):
        items.append(ItemsEntry(scenario=scenario, key=key, n_items=len(its)))
        for j, it in enumerate(its):
            for name, arr in zip(("y", "pa", "pb", "groups"), it):
                arrays[f"i{i}_{j}_{name}"] = np.asarray(arr)
    row_sets = []
    for i, ((scenario, key), sets) in enumerate(ev.row_sets.items()):
        row_sets.append(ItemsEntry(scenario=scenario, key=key, n_items=len(sets)))
        for j, row_set in enumerate(sets):
            for name, arr in zip(ROW_SET_ARRAYS, row_set):
                arrays[f"r{i}_{j}_{name}"] = np.asarray(arr)
    calibration = []
    for i, ((scenario, horizon), parts) in enumerate(ev.calibration.items()):
        calibration.append(CalibrationEntry(scenario=scenario, horizon=int(horizon), n_parts=len(parts)))
        for j, part in enumerate(parts):
            for name, arr in zip(("y", "p", "groups"), part):
                arrays[f"c{i}_{j}_{name}"] = np.asarray(arr)
    for name, arr in arrays.items():
        if arr.dtype.hasobject:  # would need pickle to write, and to read back
            raise TypeError(f"evidence array {name} has dtype {arr.dtype}: only plain numeric and string arrays")
    return arrays, items, calibration, row_sets


def save_unit(
    unit_dir: Path,
    ev: Evidence,
    scenario: str,
    seed: int,
    fingerprint: Mapping[str, Any],
    stage_seconds: Mapping[str, float],
) -> Path:
    """Write the unit's evidence to unit_dir (arrays first, then the JSON that marks it done),
    each atomically. Returns the JSON's path."""
    arrays, items, calibration, row_sets = _arrays(ev)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    data = buf.getvalue()
    atomic_write_bytes(unit_dir / ARRAYS, data)
    doc = UnitFile(
        format=FORMAT,
        scenario=scenario,
        seed=int(seed),
        fingerprint=dict(fingerprint),
        npz_sha256=hashlib.sha256(data).hexdigest(),
        stage_seconds=dict(stage_seconds),
        items=items,
        methods=[MethodsEntry(scenario=s, key=k, a=a, b=b) for (s, k), (a, b) in ev.methods.items()],
        per_seed=[PerSeedEntry(scenario=s, key=k, seeds=dict(v)) for (s, k), v in ev.per_seed.items()],
        calibration=calibration,
        summaries=dict(ev.summaries),
        curves=ev.curves,
        privacy=dict(ev.privacy),
        notes=dict(ev.notes),
        diagnostics=dict(ev.diagnostics),
        row_sets=row_sets,
    )
    return atomic_write_text(unit_dir / DONE, doc.model_dump_json(indent=1))


def read_unit_file(unit_dir: Path) -> UnitFile:
    """evidence_unit.json, validated (UnitFileError names the file and the field)."""
    return read_marker(unit_dir / DONE, UnitFile, "evidence unit file", FORMAT)


def read_marker(path: Path, model: type[M], what: str, fmt: int) -> M:
    """A marker file the job wrote (a unit's, a federation's), validated by its pydantic `model`
    and its `format` field; UnitFileError names the file and the field."""
    try:
        doc = strict_model(model, path.read_bytes(), path)
    except StrictFileError as exc:
        raise UnitFileError(str(exc)) from None
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(document)'}: {e['msg']}" for e in exc.errors())
        raise UnitFileError(f"{path}: not a valid {what} ({fields})") from None
    if (found := doc.format) != fmt:
        raise UnitFileError(f"{path}: field format is {found}, this job reads format {fmt}")
    return doc


def check_fingerprint(unit_dir: Path, doc: UnitFile, fingerprint: Mapping[str, Any]) -> None:
    """Refuse a finished unit whose config differs from the job's, naming the first field."""
    refuse_another_config(unit_dir / DONE, "unit", doc.fingerprint, fingerprint)


def refuse_another_config(path: Path, what: str, recorded: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> None:
    """UnitConfigMismatch naming the first field where the fingerprint `path` records for a
    finished `what` (a unit, a federation) differs from the job's."""
    if (field := _difference(dict(recorded), dict(fingerprint))) is not None:
        raise UnitConfigMismatch(
            f"{path}: config field {field} is {_get(dict(recorded), field)!r} in the finished {what} "
            f"but {_get(dict(fingerprint), field)!r} now: resume=true reuses a {what} only with the config it "
            "ran with (rerun it with resume=false, or move it away)"
        )


def load_unit(unit_dir: Path, doc: UnitFile | None = None) -> Evidence:
    """The unit's Evidence from unit_dir (its JSON `doc`, if already read)."""
    doc = doc or read_unit_file(unit_dir)
    path = unit_dir / ARRAYS
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UnitFileError(f"{path}: missing, though {unit_dir / DONE} marks the unit done") from None
    if (sha := hashlib.sha256(data).hexdigest()) != doc.npz_sha256:
        raise UnitFileError(
            f"{path}: sha256 {sha} differs from field npz_sha256 {doc.npz_sha256} of {unit_dir / DONE} "
            "(truncated or replaced)"
        )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise UnitFileError(f"{path}: not a readable npz ({err})") from None

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            raise UnitFileError(f"{path}: array {name} missing (listed in {unit_dir / DONE})")
        return arrays[name]

    ev = Evidence()
    for i, entry in enumerate(doc.items):
        ev.items[(entry.scenario, entry.key)] = [
            tuple(array(f"i{i}_{j}_{n}") for n in ("y", "pa", "pb", "groups"))  # type: ignore[misc]
            for j in range(entry.n_items)
        ]
    for i, entry in enumerate(doc.row_sets):
        ev.row_sets[(entry.scenario, entry.key)] = [
            tuple(array(f"r{i}_{j}_{n}") for n in ROW_SET_ARRAYS)  # type: ignore[misc]
            for j in range(entry.n_items)
        ]
    for i, c in enumerate(doc.calibration):
        ev.calibration[(c.scenario, c.horizon)] = [
            tuple(array(f"c{i}_{j}_{n}") for n in ("y", "p", "groups"))  # type: ignore[misc]
            for j in range(c.n_parts)
        ]
    ev.methods = {(m.scenario, m.key): (m.a, m.b) for m in doc.methods}
    for p in doc.per_seed:
        ev.per_seed[(p.scenario, p.key)] = dict(p.seeds)
    for s, rows in doc.summaries.items():
        ev.summaries[s] = dict(rows)
    ev.curves = {s: {m: dict(c) for m, c in methods.items()} for s, methods in doc.curves.items()}
    for s, runs in doc.privacy.items():
        ev.privacy[s] = dict(runs)
    for s, notes in doc.notes.items():
        ev.notes[s] = list(notes)
    for s, runs in doc.diagnostics.items():
        ev.diagnostics[s] = dict(runs)
    return ev


__all__ = [
    "ARRAYS",
    "DONE",
    "Evidence",
    "Marker",
    "UnitConfigMismatch",
    "UnitFile",
    "UnitFileError",
    "check_fingerprint",
    "load_unit",
    "read_marker",
    "read_unit_file",
    "refuse_another_config",
    "save_unit",
    "unit_fingerprint",
]
