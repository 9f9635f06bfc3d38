"""client/deploy/flower_patches.py and server/deploy/flower_patches.py rebind names in Flower's modules, read
from flwr 1.41. These tests fail when Flower changes under a patch: another minor version, a name
gone, a signature without the keywords passed, or a function that no longer calls the name
rebound (then the patch would silently stop taking effect). The behaviour of each patch is
tested beside its users (tests/deploy/test_supernode_pace.py, test_warm_site.py, test_exchange.py,
test_join_restart.py)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import flwr
import flwr.superlink.grid.http_grid as flower_http_grid
import flwr.supernode.start_client_internal as flower_loop
import pytest
from flwr.supercore import sql_mixin
from flwr.supercore.inflatable import inflatable_utils
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.supernode.runtime import run_clientapp

from client.deploy import flower_patches as client_patches
from server.deploy import flower_patches as server_patches


def _flowers(fn: Any) -> Callable[..., Any]:
    """Flower's function behind one of our patches (a wrapper or a partial), else fn itself."""
    if isinstance(fn, functools.partial):
        return fn.func
    return getattr(fn, "__wrapped__", fn)


def _parameters(fn: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("patches", [client_patches, server_patches])
def test_the_patches_were_read_from_the_flower_installed(patches: Any) -> None:
    assert flwr.__version__.rsplit(".", 1)[0] == patches.FLWR_VERSION, (
        f"flwr {flwr.__version__} installed, the patches in {patches.__name__} were read from "
        f"{patches.FLWR_VERSION}: read them again against it"
    )


def test_the_backoff_keywords_the_patches_pass_still_exist() -> None:
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        params = inspect.signature(fn).parameters
        assert {"initial_backoff", "backoff_cap"} <= set(params), fn.__name__
        assert params["initial_backoff"].kind is inspect.Parameter.KEYWORD_ONLY


def test_the_supernode_loop_still_has_and_calls_the_names_set_pace_rebinds() -> None:
    loop_names = flower_loop.start_client_internal.__code__.co_names
    assert "_pull_and_store_message" in loop_names and "_push_messages" in loop_names
    pull = _flowers(flower_loop._pull_and_store_message)
    push = _flowers(flower_loop._push_messages)
    # until_message loops until the pull returns a run id (None: no message); telling wraps a push.
    assert inspect.signature(pull).return_annotation in ("int | None", int | None)
    assert _parameters(pull)[:3] == ["state", "object_store", "node_config"]
    assert _parameters(push) == ["state", "object_store", "send", "push_object"]
    assert "pull_objects" in pull.__code__.co_names and "time" in push.__code__.co_names
    assert _flowers(flower_loop.pull_objects) is inflatable_utils.pull_objects
    assert hasattr(flower_loop.time, "sleep")


def test_the_clientapp_runtime_still_pulls_through_the_name_set_pull_backoff_rebinds() -> None:
    assert "pull_and_inflate_object_from_tree" in run_clientapp.pull_task_input.__code__.co_names
    assert (
        _flowers(run_clientapp.pull_and_inflate_object_from_tree) is inflatable_utils.pull_and_inflate_object_from_tree
    )


def test_the_http_grid_still_pulls_through_the_name_set_reply_pull_backoff_rebinds() -> None:
    assert "pull_objects" in HttpGrid.pull_messages.__code__.co_names
    assert _flowers(flower_http_grid.pull_objects) is inflatable_utils.pull_objects


def test_flowers_sqlite_connections_still_read_the_pragmas_set_sqlite_busy_timeout_raises() -> None:
    # Flower reads the module attribute at every new connection: a copy taken at import would not.
    assert "SQLITE_PRAGMAS" in sql_mixin._set_sqlite_pragmas.__code__.co_names
    assert "busy_timeout" in dict(sql_mixin.SQLITE_PRAGMAS)
