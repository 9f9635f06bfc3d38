"""A site's `device` setting (issue 41): auto | cpu | cuda resolve on this machine, and `cuda`
where torch sees no GPU is a clear error at start, not a silent CPU run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from client.site_runtime import SiteConfig, SiteRuntime
from healthfm_core.train.device import check_device_setting, resolve_device

ROOT = Path(__file__).resolve().parents[2]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def test_cpu_and_auto_resolve_on_this_machine() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" Auto ") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@no_gpu
def test_cuda_without_a_gpu_is_an_error_that_says_so() -> None:
    for setting in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match=r"device='cuda.*torch sees no CUDA device here.*auto or cpu"):
            resolve_device(setting)


def test_an_unknown_setting_is_refused_by_name() -> None:
    for bad in ("gpu", "cuda:x", "", "mps"):
        with pytest.raises(ValueError, match=r"expected auto, cpu, cuda or cuda:N"):
            check_device_setting(bad)


def test_node_config_device_defaults_to_auto_and_is_checked(tmp_path: Path) -> None:
    assert SiteConfig.from_node_config({"site-root": str(tmp_path)}).device == "auto"
    assert SiteConfig.from_node_config({"site-root": str(tmp_path), "device": "CPU"}).device == "cpu"
    with pytest.raises(ValueError, match=r"(?s)invalid node config.*node config device='gpu'"):
        SiteConfig.from_node_config({"site-root": str(tmp_path), "device": "gpu"})


@no_gpu
def test_a_site_asking_for_cuda_without_a_gpu_fails_at_start(tmp_path: Path) -> None:
    # Before the site's data is opened: the error is the device's, whatever the data.
    with pytest.raises(ValueError, match=r"node config device='cuda'.*no CUDA device"):
        SiteRuntime(SiteConfig(site_root=tmp_path / "absent", device="cuda"))


def test_the_simulations_site_policy_names_a_valid_device() -> None:
    site = yaml.safe_load((ROOT / "configs" / "federation" / "default.yaml").read_text())["site"]
    assert check_device_setting(site["device"]) == "auto"
