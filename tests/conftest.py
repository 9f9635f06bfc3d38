"""Shared pytest fixtures. Each block says whose tests it serves; add yours below.

The fixtures of tests/helpers/ are registered here (`pytest_plugins`), so a test module asks for
them by name and imports no fixture: the deployed federation's (`sites`, `federation`,
`superlink`, `joined`), the ServerApp's identity in this process (`serverapp_identity`), and
the two-round run with its release (`released_run`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers.site_tables import SiteTables, make_site_tables, write_site_tables

pytest_plugins = ("helpers.deploy_fixtures", "helpers.in_process_grid", "helpers.release_run")

# --------------------------------------------------------------------------------------------
# Site data (tests/unit/test_site.py, tests/unit/test_site_check.py, tests/unit/test_client_check.py): a small
# valid site written with pyarrow, to be broken one way at a time.


@pytest.fixture
def site_tables() -> SiteTables:
    return make_site_tables()


@pytest.fixture
def write_site(tmp_path: Path) -> Callable[[SiteTables], Path]:
    counter = iter(range(1_000_000))

    def write(tables: SiteTables) -> Path:
        return write_site_tables(tables, tmp_path / f"site{next(counter)}")

    return write


@pytest.fixture(scope="session")
def meds_sample_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The static MEDS sample datasets shipped by meds-testing-helpers, written to disk."""
    from importlib.resources import files

    from meds_testing_helpers.dataset import MEDSDataset

    out = tmp_path_factory.mktemp("meds_samples")
    sites = {}
    for yaml_path in sorted(
        files("meds_testing_helpers").joinpath("static_sample_data").iterdir(), key=lambda p: p.name
    ):
        if not yaml_path.name.endswith(".yaml"):
            continue
        name = yaml_path.name[: -len(".yaml")]
        MEDSDataset.from_yaml(Path(str(yaml_path))).write(out / name)
        sites[name] = out / name
    assert sites, "meds-testing-helpers ships no static sample datasets"
    return sites


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs two workers, one a core) each worker keeps torch to
    one thread: two workers of two threads each on two cores would make OpenMP's threads wait
    on each other. Tests that need more threads set them and restore them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
