"""client/deploy/flower_patches.py and server/deploy/flower_patches.py rebind names in Flower's modules, read
from flwr 1.41. These tests fail when Flower changes under a patch: another minor version, a name
gone, a signature without the keywords passed, or a function that no longer calls the name
rebound (then the patch would silently stop taking effect). The behaviour of each patch is
tested beside its users (tests/deploy/test_supernode_pace.py, test_warm_site.py, test_exchange.py,
test_join_restart.py)."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import flwr
import flwr.superlink.grid.http_grid as flower_http_grid
import flwr.superlink.main as flower_superlink_app
import flwr.superlink.routers.fleet.router as fleet_router
import flwr.superlink.servicer.fleet.fleet_handlers as flower_fleet
import flwr.superlink.servicer.runtime.runtime_handlers as flower_runtime
import flwr.supernode.main as flower_supernode_app
import flwr.supernode.servicer.runtime.runtime_handlers as flower_node_runtime
import flwr.supernode.start_client_internal as flower_loop
import pytest
from flwr.proto.message_pb2 import PullObjectResponse
from flwr.supercore import sql_mixin
from flwr.supercore.inflatable import inflatable_utils
from flwr.superlink.grid.http_grid import HttpGrid
from flwr.supernode.runtime import run_clientapp

from client.deploy import flower_patches as client_patches
from healthfm_core.long_poll import MARK, unwrapped
from server.deploy import flower_patches as server_patches


def _flowers(fn: Any) -> Callable[..., Any]:
    """Flower's function behind our patches (wrappers and partials, nested), else fn itself."""
    while True:
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        else:
            return fn


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


def test_flowers_routers_still_look_up_the_handlers_hold_pulls_and_set_pace_rebind() -> None:
    # Each router must call the handler through the module whose name the patches rebind, at each
    # call: a router that kept a reference of its own would never see a held or notifying handler.
    assert fleet_router.fleet_handlers is flower_fleet
    assert "pull_messages" in fleet_router.fleet_pull_messages.__code__.co_names
    assert "push_messages" in fleet_router.fleet_push_messages.__code__.co_names
    assert "pull_object" in fleet_router.fleet_pull_object.__code__.co_names
    assert "push_object" in fleet_router.fleet_push_object.__code__.co_names
    assert flower_superlink_app._RUNTIME_HANDLERS is flower_runtime
    assert flower_supernode_app._RUNTIME_HANDLERS is flower_node_runtime
    # the Runtime API's endpoints (the package exports its APIRouter under the module's name)
    runtime_router = importlib.import_module("flwr.supercore.routers.runtime.router")
    for name in ("pull_messages", "push_messages", "pull_object", "push_object", "acquire_task"):
        endpoint = getattr(runtime_router, name)
        assert "handlers" in inspect.signature(endpoint).parameters, name
        assert name in endpoint.__code__.co_names, (name, endpoint.__code__.co_names)


def test_the_supernode_stores_a_message_and_its_task_before_pulling_its_objects() -> None:
    # set_pace wakes the app guard's held call for a task when pull_objects starts: the task must
    # exist by then (else the guard finds none and waits out its hold).
    source = inspect.getsource(_flowers(flower_loop._pull_and_store_message))
    assert source.index("state.create_task(") < source.index("state.store_message(") < source.index("pull_objects(")


def test_the_supernode_confirms_a_message_after_storing_its_objects_and_gets_confirm_by_keyword() -> None:
    # until_message wakes the ClientApp's held object pulls when Flower calls its
    # confirm_message_received: the objects must be in the store by then, and the loop must pass
    # that callable by keyword (the wrapper swaps it there).
    source = inspect.getsource(_flowers(flower_loop._pull_and_store_message))
    assert source.index("object_store.put(") < source.index("confirm_message_received(run_id")
    assert "confirm_message_received=confirm_message_received" in inspect.getsource(flower_loop.start_client_internal)


def test_hold_pulls_wraps_flowers_own_handlers_once_and_waits_only_for_objects_still_uploading(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = ("pull_messages", "pull_object", "push_messages", "push_object")
    flowers = {(m, n): unwrapped(getattr(m, n)) for m in (flower_fleet, flower_runtime) for n in names}
    for (module, name), fn in flowers.items():
        monkeypatch.setattr(module, name, fn)  # restored after the test: this process is no SuperLink
    server_patches.hold_pulls()
    server_patches.hold_pulls()  # set twice: still one layer over Flower's handler
    for (module, name), fn in flowers.items():
        patched = getattr(module, name)
        assert getattr(patched, MARK, False) and patched.__wrapped__ is fn, (module.__name__, name)
    uploading = PullObjectResponse(object_found=True, object_available=False)
    assert not server_patches._object_there(uploading)
    assert server_patches._object_there(PullObjectResponse(object_found=True, object_available=True))
    assert server_patches._object_there(PullObjectResponse(object_found=False, object_available=False))
