"""House rules on imports, read from the source (ast), so a function-level import counts too.

- healthfm_core never imports flwr, server, client, simulations or secure_aggregation;
- client and server never import each other;
- secure_aggregation (the SecAgg+ steps both sides call) never imports client, server or simulations;
- client/ and server/ each keep their learning code at the top and their process supervision and
  Flower surgery in deploy/ (docs/architecture.md, "Folders"): deploy/ imports the learning
  rooms, never the other way, but for the few doors named in DEPLOY_DOORS;
- the project's modules import each other without a cycle (module-level and function-level
  imports alike; ``from pkg import mod`` is an import of the module pkg.mod).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("healthfm_core", "client", "server", "simulations", "secure_aggregation")
FORBIDDEN = {
    "healthfm_core": ("flwr", "server", "client", "simulations", "secure_aggregation"),
    "client": ("server",),
    "server": ("client",),
    "secure_aggregation": ("client", "server", "simulations"),
}
DEPLOY = ("client.deploy", "server.deploy")
# The only learning-room modules that import their side's deploy/, and what each may import there.
DEPLOY_DOORS = {
    # the site's command line: `join` and `approve` are deployment commands
    "client.client": {"client.deploy.approval", "client.deploy.join", "client.deploy.supernode_pace"},
    # the coordinator's command line (`python -m server.coordinator`)
    "server.coordinator": {"server.deploy.coordinator"},
    # the ServerApp (and the task head's, below) applies the server's Flower patch as its process starts
    "server.server_app": {"server.deploy.flower_patches"},
    # admission reads the coordinator's site registry (pretraining's roster, the task head's sites)
    "server.roster": {"server.deploy.registry"},
    "server.head_app": {"server.deploy.registry", "server.deploy.flower_patches"},
}


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
        "server.deploy.coordinator",
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
    # "from healthfm_core.kernels.ct_attention import triton" names a module of the project.
    tree = ast.parse("def f():\n    from healthfm_core.kernels.ct_attention import triton\n")
    names = [n for n, _ in _imported_names("x", REPO / "x.py", tree)]
    assert _project_target(names[-1]) == "healthfm_core.kernels.ct_attention.triton"
