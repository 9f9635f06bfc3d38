"""House rules on imports, read from the source (ast), so a function-level import counts too.

- healthfm_core never imports flwr, server, client, simulations or secure_aggregation;
- client and server never import each other;
- secure_aggregation (the SecAgg+ steps both sides call) never imports client, server or simulations;
- client/ and server/ each keep their learning code at the top and their process supervision and
  Flower surgery in deploy/ (docs/architecture.md, "Folders"): deploy/ imports the learning
  rooms, never the other way, but for the few doors named in DEPLOY_DOORS;
- the project's modules import each other without a cycle (module-level and function-level
  imports alike; ``from pkg import mod`` is an import of the module pkg.mod);
- healthfm_core's own rooms are layered (CORE_ROOMS, and data/'s rooms in DATA_ROOMS): no module
  imports a room above its own; the wire protocol (healthfm_core/protocol/) sits on the floor, on
  terms/ alone, and importing it loads no torch, polars, pyarrow or meds;
- neither healthfm_core, client nor server imports simulations/ (the synthetic generator lives there);
- no test module imports another test module or conftest: what tests share is in tests/helpers/,
  imported as ``helpers.<module>``, and fixtures are registered in conftest.py;
- every test module sits in a folder of its level (TEST_LEVELS), and only deploy/ starts real
  processes through the deployed federation's helpers (DEPLOY_HELPERS).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import meds
import pytest

from healthfm_core.terms.site_layout import SPLITS

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("healthfm_core", "client", "server", "simulations", "secure_aggregation")
FORBIDDEN = {
    "healthfm_core": ("flwr", "server", "client", "simulations", "secure_aggregation"),
    "client": ("server", "simulations"),
    "server": ("client", "simulations"),
    "secure_aggregation": ("client", "server", "simulations"),
}
DEPLOY = ("client.deploy", "server.deploy")
# The only learning-room modules that import their side's deploy/, and what each may import there.
DEPLOY_DOORS = {
    # the site's command line: `join` and `approve` are deployment commands
    "client.client": {"client.deploy.approval", "client.deploy.join", "client.deploy.supernode_pace"},
    # the coordinator's command line (`python -m server.coordinator`); `dashboard` straight to its
    # own module, which imports none of the other commands' machinery (no torch)
    "server.coordinator": {"server.deploy.commands", "server.deploy.dashboard.serve"},
    # the ServerApp (and the task head's, below) applies the server's Flower patch as its process starts
    "server.server_app": {"server.deploy.flower_patches"},
    # admission reads the coordinator's site registry (pretraining's roster, the task head's sites)
    "server.roster": {"server.deploy.registry"},
    "server.head_app": {"server.deploy.registry", "server.deploy.flower_patches"},
}


# healthfm_core's rooms, lowest first: a module may import its own room and those before it. A
# top-level module of healthfm_core in no room counts as the lowest (a plain utility).
CORE_ROOMS: tuple[tuple[str, ...], ...] = (
    ("healthfm_core.files", "healthfm_core.strict_files", "healthfm_core.first_error"),
    ("healthfm_core.terms",),  # what the messages are made of: groups, objectives, the model config, task specs...
    ("healthfm_core.protocol",),  # the wire protocol: what client/ and server/ exchange, on the floor
    ("healthfm_core.kernels",),
    ("healthfm_core.data",),
    ("healthfm_core.model",),
    ("healthfm_core.privacy", "healthfm_core.train"),
    ("healthfm_core.eval",),
    (
        "healthfm_core.release",
        "healthfm_core.release_fit",
        "healthfm_core.release_signing",
        "healthfm_core.personal_weights",
    ),
)
# healthfm_core/data/'s rooms, lowest first (docs/architecture.md, "Site data on disk").
DATA_ROOMS: tuple[tuple[str, ...], ...] = (
    ("healthfm_core.data.files",),
    ("healthfm_core.data.sequences",),
    ("healthfm_core.data.labels",),
    ("healthfm_core.data.checks",),
    ("healthfm_core.data.sites",),
)
# What importing the wire protocol may not load (a fresh interpreter's sys.modules): the torch
# model, the data frames, and the site-file readers below them (test_protocol_is_on_the_floor).
PROTOCOL_NEVER_LOADS = ("torch", "polars", "pyarrow", "meds", "omegaconf", "scipy", "pandas")
TESTS = REPO / "tests"
# The tests' folders by level (docs/architecture.md, "Folders").
TEST_LEVELS = ("unit", "federation", "deploy")
# The helpers that start and stop real SuperLink, SuperNode and nginx processes: deploy/'s alone.
DEPLOY_HELPERS = ("helpers.deploy_fixtures", "helpers.process_faults", "helpers.supernode_log")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[_module_name(path)] = (path, ast.parse(path.read_text(), filename=str(path)))
    return found


SOURCES = _sources()


def _imported_names(module: str, path: Path, tree: ast.Module) -> Iterator[tuple[str, int]]:
    """The dotted name of every import in the file, with its line; relative imports resolved.

    ``from a.b import c`` gives a.b.c: the module a.b.c where there is one, else a name defined
    in a.b (``_project_target`` takes the longest prefix that is a module). Parent packages,
    which Python initialises first, are not counted: a package's __init__ that re-exports its
    modules would otherwise form a "cycle" with every module that imports a sibling.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno


def _project_target(name: str) -> str | None:
    """The project module an imported name refers to: the longest prefix that is one."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in SOURCES:
            return candidate
    return None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in SOURCES}
    for module, (path, tree) in SOURCES.items():
        for name, _ in _imported_names(module, path, tree):
            target = _project_target(name)
            if target is not None and target != module:
                graph[module].add(target)
    return graph


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle through the component's first module, as a -> b -> ... -> a."""
    start = min(component)
    parents: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node] & component):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if child not in parents:
                parents[child] = node
                queue.append(child)
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_sources_found() -> None:
    assert {
        "healthfm_core.model.healthfm",
        "client.client",
        "client.deploy.join",
        "server.strategy",
        "server.deploy.commands",
        "simulations.run",
        "secure_aggregation.site",
    } <= set(SOURCES)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_forbidden_imports(package: str) -> None:
    bad = []
    for module, (path, tree) in SOURCES.items():
        if module.split(".")[0] != package:
            continue
        for name, line in _imported_names(module, path, tree):
            top = name.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not bad, "\n".join(sorted(set(bad)))


def _in_deploy(module: str) -> bool:
    return any(module == d or module.startswith(f"{d}.") for d in DEPLOY)


def test_learning_rooms_do_not_import_deploy() -> None:
    bad = []
    for module, targets in _graph().items():
        if module.split(".")[0] not in ("client", "server") or _in_deploy(module):
            continue
        extra = {t for t in targets if _in_deploy(t)} - DEPLOY_DOORS.get(module, set())
        bad += [f"{SOURCES[module][0].relative_to(REPO)} imports {t}" for t in sorted(extra)]
    assert not bad, "\n".join(bad)


def test_deploy_doors_are_used() -> None:
    # An entry that no longer matches an import would silently widen the rule.
    graph = _graph()
    for module, allowed in DEPLOY_DOORS.items():
        assert allowed <= graph[module], f"{module}: {sorted(allowed - graph[module])} not imported"


def test_no_import_cycles() -> None:
    graph = _graph()
    components = _components(graph)
    assert not components, "import cycles:\n" + "\n".join(" -> ".join(_cycle_in(c, graph)) for c in components)


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert _components(graph) == [{"a", "b", "c"}]
    assert _cycle_in({"a", "b", "c"}, graph) == ["a", "b", "c", "a"]
    assert _components({"a": {"b"}, "b": set()}) == []


def test_from_package_import_module_is_an_edge_to_the_module() -> None:
    # "from healthfm_core.kernels.ct_attention import kernels" names a module of the project.
    tree = ast.parse("def f():\n    from healthfm_core.kernels.ct_attention import kernels\n")
    names = [n for n, _ in _imported_names("x", REPO / "x.py", tree)]
    assert _project_target(names[-1]) == "healthfm_core.kernels.ct_attention.kernels"


def _level(module: str, rooms: tuple[tuple[str, ...], ...]) -> int | None:
    """The index of the module's room (the longest prefix that names one), None outside them."""
    for level, room in enumerate(rooms):
        if any(module == r or module.startswith(f"{r}.") for r in room):
            return level
    return None


def _upward_imports(rooms: tuple[tuple[str, ...], ...], within: str) -> list[str]:
    bad = []
    for module, targets in _graph().items():
        if not module.startswith(f"{within}.") and module != within:
            continue
        mine = _level(module, rooms)
        for target in sorted(targets):
            theirs = _level(target, rooms)
            if theirs is None or not target.startswith(f"{within}."):
                continue
            if (mine if mine is not None else 0) < theirs:
                bad.append(f"{SOURCES[module][0].relative_to(REPO)} imports {target}, a room above its own")
    return bad


def test_healthfm_core_rooms_import_only_below() -> None:
    assert not (bad := _upward_imports(CORE_ROOMS, "healthfm_core")), "\n".join(bad)


def test_data_rooms_import_only_below() -> None:
    assert not (bad := _upward_imports(DATA_ROOMS, "healthfm_core.data")), "\n".join(bad)


def test_every_room_is_a_package_of_the_project() -> None:
    # A room renamed or removed would silently widen the rules above.
    for room in (*CORE_ROOMS, *DATA_ROOMS):
        for name in room:
            assert name in SOURCES, f"{name} names no module or package"


def test_protocol_is_on_the_floor() -> None:
    """Importing every module of the wire protocol, in a fresh interpreter, loads none of
    PROTOCOL_NEVER_LOADS: a server or a site parses a message without the model or the data code
    (CORE_ROOMS keeps its imports to the floor below it: files, strict_files, first_error, terms/)."""
    protocol = sorted(m for m in SOURCES if m == "healthfm_core.protocol" or m.startswith("healthfm_core.protocol."))
    assert len(protocol) > 10, protocol
    code = (
        "import importlib, json, sys\n"
        f"for name in {protocol!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert "healthfm_core" in loaded and "pydantic" in loaded  # it did import the protocol
    assert not (heavy := sorted(loaded & set(PROTOCOL_NEVER_LOADS))), f"importing the protocol loads {heavy}"


def test_split_names_are_meds() -> None:
    # terms/site_layout.py writes MEDS's split names out (the protocol loads no meds): still MEDS's.
    assert (meds.train_split, meds.tuning_split, meds.held_out_split) == SPLITS


def _test_imports(path: Path) -> Iterator[tuple[str, int]]:
    """Imports in a file of tests/ that name a test module, conftest, or tests.<anything>."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top.startswith("test_") or top in ("conftest", "tests"):
                yield name, node.lineno


def test_no_test_module_imports_another() -> None:
    bad = []
    for path in sorted(TESTS.rglob("*.py")):
        for name, line in _test_imports(path):
            bad.append(f"{path.relative_to(REPO)}:{line} imports {name} (move what it needs to tests/helpers/)")
    assert not bad, "\n".join(bad)


def test_the_test_import_rule_finds_a_test_module_import(tmp_path: Path) -> None:
    source = tmp_path / "test_y.py"
    source.write_text(
        "from test_x import y\nimport conftest\nfrom tests.helpers.a import b\nfrom helpers.a import b\n"
        "def f():\n    from test_z import w\n"
    )
    assert [name for name, _ in _test_imports(source)] == ["test_x", "conftest", "tests.helpers.a", "test_z"]


def test_every_test_module_sits_in_the_folder_of_its_level() -> None:
    modules = sorted(TESTS.rglob("test_*.py"))
    assert len(modules) > 100, len(modules)
    misplaced = [
        str(p.relative_to(TESTS)) for p in modules if p.parent.parent != TESTS or p.parent.name not in TEST_LEVELS
    ]
    assert not misplaced, f"not in tests/{{{','.join(TEST_LEVELS)}}}/: {misplaced}"


def test_only_deploy_tests_use_the_deployed_federations_helpers() -> None:
    bad = []
    for level in ("unit", "federation"):
        for path in sorted((TESTS / level).glob("test_*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(DEPLOY_HELPERS):
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}")
    assert not bad, "\n".join(bad)


# One spelling per rule: each privacy floor, bound and default is defined once (module, name, value)
# and every field or parameter that takes it names it: its default (or ``le=`` bound) is that name,
# never a literal. A field is "name" in any module or "module:name" in one (where the name means
# other things elsewhere, e.g. ``min_subjects``).
SINGLE_SPELLINGS: tuple[tuple[str, str, int, str, tuple[str, ...]], ...] = (
    # the secure sum's floor (run config, site policy, the round's config, the site's own round)
    (
        "secure_aggregation.config",
        "DEFAULT_MIN_HOLDERS",
        3,
        "default",
        ("secagg_min_holders", "min_holders", "site_min_holders"),
    ),
    # the most holders the 16-bit field holds (run config and site policy)
    ("secure_aggregation.config", "MAX_HOLDERS", 257, "le", ("secagg_min_holders",)),
    # the report floors a metric must clear to leave a site (site runtime, `client.py check`)
    (
        "healthfm_core.terms.report_floor",
        "DEFAULT_MIN_SUBJECTS",
        20,
        "default",
        ("min_report_subjects", "healthfm_core.data.checks.task_check:min_subjects"),
    ),
    (
        "healthfm_core.terms.report_floor",
        "DEFAULT_MIN_POSITIVES",
        5,
        "default",
        (
            "min_report_positives",
            "healthfm_core.data.checks.task_check:min_positives",
            "client.model_use:min_positives",
        ),
    ),
    # the fewest subjects a code is named for (site runtime, vocabulary threshold, the statistics)
    (
        "healthfm_core.data.sequences.code_stats",
        "DEFAULT_MIN_CODE_SUBJECTS",
        10,
        "default",
        (
            "min_code_subjects",
            "vocab_min_subjects",
            "healthfm_core.data.sequences.code_stats:min_subjects",
            "healthfm_core.data.sequences.vocab:min_subjects",
        ),
    ),
)


def _field_values(tree: ast.Module, kind: str) -> Iterator[tuple[str, ast.expr, int]]:
    """(field or parameter name, its default or ``le=`` bound, line) of every class field and
    function parameter in the module that has one."""
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            value = node.value
            is_field = isinstance(value, ast.Call) and getattr(value.func, "id", None) == "Field"
            if is_field:
                assert isinstance(value, ast.Call)
                keywords = {k.arg: k.value for k in value.keywords}
                found = keywords.get(kind) if kind != "default" or value.args == [] else value.args[0]
                if found is not None:
                    yield node.target.id, found, node.lineno
            elif kind == "default":
                yield node.target.id, value, node.lineno
        elif kind == "default" and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                yield arg.arg, default, node.lineno


@pytest.mark.parametrize("rule", SINGLE_SPELLINGS, ids=lambda rule: rule[1])
def test_each_privacy_floor_and_bound_has_one_spelling(rule: tuple[str, str, int, str, tuple[str, ...]]) -> None:
    module, name, value, kind, fields = rule
    import importlib

    assert getattr(importlib.import_module(module), name) == value, f"{module}.{name} is not {value}"
    defined = [m for m, (_, tree) in SOURCES.items() for n in tree.body if _assigns(n, name)]
    assert defined == [module], f"{name} defined in {defined}, expected in {module} alone"
    uses, bad = 0, []
    for mod, (path, tree) in SOURCES.items():
        for field, expr, line in _field_values(tree, kind):
            if field not in fields and f"{mod}:{field}" not in fields:
                continue
            if isinstance(expr, ast.Constant) and expr.value is None:  # "not set": another value decides
                continue
            uses += 1
            named = expr.id if isinstance(expr, ast.Name) else expr.attr if isinstance(expr, ast.Attribute) else None
            if named != name:
                bad.append(f"{path.relative_to(REPO)}:{line} {field} = {ast.unparse(expr)} (expected {name})")
    assert not bad, "\n".join(bad)
    assert uses >= 2, f"{name}: {uses} field(s) take it; the rule's field names are stale"


def _assigns(node: ast.stmt, name: str) -> bool:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return any(isinstance(t, ast.Name) and t.id == name for t in targets)


def test_the_secure_sums_largest_holder_count_is_no_literal() -> None:
    # 257 is what the 16-bit field holds (secure_aggregation/config.py MAX_HOLDERS, derived from it).
    found = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path, tree in SOURCES.values()
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and type(node.value) is int and node.value == 257
    ]
    assert not found, found


def _top_level_names(tree: ast.Module) -> set[str] | None:
    """The names a module defines or imports at its top (in any branch of a top-level if/try);
    None where a module-level ``__getattr__`` may supply any name."""
    names: set[str] = set()
    body = list(tree.body)
    while body:
        node = body.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == "__getattr__":
                return None
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            body.extend(node.body)
            body.extend(getattr(node, "orelse", []))
            body.extend(getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                body.extend(handler.body)
    return names


def _unresolved_project_imports(source: str, where_file: str) -> Iterator[str]:
    """Every absolute import of a project module (or a name from one) that names nothing there.

    mypy runs with ignore_missing_imports (for third-party packages without stubs), so a
    moved or renamed project module would pass it and fail only when the line runs."""
    tree = ast.parse(source, filename=where_file)
    for node in ast.walk(tree):
        wanted: list[tuple[str, str | None]]
        if isinstance(node, ast.Import):
            wanted = [(a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            wanted = [(node.module, a.name) for a in node.names]
        else:
            continue
        for module, name in wanted:
            if module.split(".")[0] not in PACKAGES:
                continue
            where = f"{where_file}:{node.lineno}"
            if module not in SOURCES:
                yield f"{where}: no project module {module}"
            elif name is not None and name != "*" and f"{module}.{name}" not in SOURCES:
                defined = _top_level_names(SOURCES[module][1])
                if defined is not None and name not in defined:
                    yield f"{where}: {module} defines no {name}"


def test_every_project_import_names_a_module_or_name_that_exists() -> None:
    files = [p for folder in (*PACKAGES, "tests", "benchmarks") for p in sorted((REPO / folder).rglob("*.py"))]
    unresolved = [
        line for path in files for line in _unresolved_project_imports(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert not unresolved, "\n".join(unresolved)


def test_the_import_check_finds_a_moved_module() -> None:
    stale = (
        "from healthfm_core.model.config import load_model_config\nfrom healthfm_core.protocol import NoSuchMessage\n"
    )
    found = list(_unresolved_project_imports(stale, "stale.py"))
    assert len(found) == 2 and "no project module healthfm_core.model.config" in found[0], found
    assert "defines no NoSuchMessage" in found[1], found
