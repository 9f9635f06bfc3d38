"""The ClientApp of an approved app bundle, imported from the bundle's own files in a process that
already runs this package (the warm ClientApp, client/deploy/warm_clientapp.py).

Flower's `flwr-clientapp` (`--clientapp cold`) unpacks the bundle, puts its directory first on
sys.path and imports the `clientapp` component in a fresh process: whatever module the bundle
ships is imported from the bundle, the rest from the site's installed packages. A warm process has
already imported `client` (itself) from the site's checkout, and Python reuses an imported module:
a bundle shipping its own `client/` ran the site's files warm and the bundle's cold, so what an
approval stood for depended on a flag (issue 26, break 6). Here, before the import:
- the bundle's bytes must hash to the sha256 the site approved; they are unpacked into a directory
  of this process's own (mode 0700; Flower's install checks each file against the bundle's
  manifest, and an install left under FLWR_HOME by another process is never reused);
- every module of this project's packages that this process imported from the site's
  installation under a top-level name the bundle ships is forgotten (sys.modules), so the import
  finds the bundle's files as a fresh process does. The warm process's own code keeps the module
  objects it holds; the ClientApp's modules (its site runtime, setups and model) are imported
  once, for the process's one run and bundle. The process runs with `python -P`: no checkout
  directory ahead of the installed packages on sys.path, as for flwr-clientapp.
Before the import and after it, every module of the bundle's own files that is loaded must have
been loaded from that file; if one was not (a bundle shipping `flwr/` or `numpy/`, which every
ClientApp process has imported before the app), the ClientApp is refused, naming the file and
what ran instead.

A bundle that ships no code (the federation's, server/deploy/bundle.py) names `client.client_app:app`:
nothing is forgotten and the ClientApp is the site's installed healthfm, as in cold mode.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn

CODE_SUFFIXES = (".py", ".pyc", ".so", ".pyd")
# pyproject.toml's packages: what a warm process may have imported before the ClientApp and a
# fresh flwr-clientapp process has not (its own code, client/, and what that imports).
PROJECT_PACKAGES = ("client", "healthfm_core", "secure_aggregation", "server", "simulations")


def shipped_names(app_dir: Path) -> set[str]:
    """The top-level module and package names an unpacked bundle provides on sys.path."""
    names = set()
    for entry in app_dir.iterdir():
        name = entry.name if entry.is_dir() else entry.name.split(".")[0]
        if name.isidentifier() and (entry.is_dir() or entry.name.endswith(CODE_SUFFIXES)):
            names.add(name)
    return names


def module_files(app_dir: Path) -> dict[str, Path]:
    """Module name -> the bundle's file for every Python source the bundle ships."""
    files = {}
    for path in sorted(app_dir.rglob("*.py")):
        parts = list(path.relative_to(app_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        if parts and all(p.isidentifier() for p in parts):
            files[".".join(parts)] = path
    return files


def _locations(module: ModuleType) -> list[Path]:
    """Where a module was loaded from (a namespace package: each of its directories)."""
    file = getattr(module, "__file__", None)
    if file:
        return [Path(file).resolve()]
    return [Path(p).resolve() for p in getattr(module, "__path__", [])]


def _inside(module: ModuleType, app_dir: Path) -> bool:
    where = _locations(module)
    return bool(where) and all(p.is_relative_to(app_dir) for p in where)


def forget_shadowing_modules(app_dir: Path) -> list[str]:
    """Drop from sys.modules this project's modules (imported from the site's installation) under
    a top-level name the bundle ships, so that the import finds the bundle's files as a fresh
    flwr-clientapp process does; the names dropped. Other packages (flwr, numpy, torch) are never
    re-imported: a bundle shipping one of those is refused by check_loaded_from_bundle."""
    shipped = shipped_names(app_dir) & set(PROJECT_PACKAGES)
    dropped = [
        name
        for name, module in list(sys.modules.items())
        if name.partition(".")[0] in shipped and module is not None and not _inside(module, app_dir)
    ]
    for name in dropped:
        del sys.modules[name]
    importlib.invalidate_caches()
    return dropped


def check_loaded_from_bundle(app_dir: Path) -> None:
    """LoadClientAppError naming the first of the bundle's files whose module this process loaded
    from anywhere else."""
    for name, path in module_files(app_dir).items():
        module = sys.modules.get(name)
        if module is None:
            continue
        where = _locations(module)
        if where != [path.resolve()]:
            loaded = ", ".join(str(p) for p in where) or "(no file)"
            raise LoadClientAppError(
                f"the approved bundle's file {path.relative_to(app_dir)} is not what this process runs: module "
                f"{name} was loaded from {loaded}; refused (the bundle's code must be importable as shipped)"
            )


class BundleCode:
    """An approved bundle unpacked into a directory of this process's own, removed with it."""

    def __init__(self, fab_content: bytes, fab_hash: str) -> None:
        digest = hashlib.sha256(fab_content).hexdigest()
        if digest != fab_hash:
            raise LoadClientAppError(f"the app bundle's content hashes to {digest}, not to its approved {fab_hash}")
        self._tmp = tempfile.TemporaryDirectory(prefix=f"healthfm-bundle-{fab_hash[:12]}-")
        self.app_dir = install_from_fab(fab_content, install_dir=Path(self._tmp.name), skip_prompt=True).resolve()

    def load(self, fab_id: str, fab_version: str) -> ClientApp:
        """The bundle's ClientApp, imported from its own files (see the module docstring)."""
        forget_shadowing_modules(self.app_dir)
        check_loaded_from_bundle(self.app_dir)  # before any of the bundle's code runs
        loader = get_load_client_app_fn(default_app_ref="", app_path=str(self.app_dir), multi_app=True)
        app = loader(fab_id, fab_version, "")
        check_loaded_from_bundle(self.app_dir)  # and what the import brought in
        return app

    def close(self) -> None:
        self._tmp.cleanup()


__all__ = ["BundleCode", "check_loaded_from_bundle", "forget_shadowing_modules", "module_files", "shipped_names"]
