"""The torch device a site trains on, from its setting: ``auto`` (CUDA when this process sees a
GPU, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

``cuda`` asks for a GPU and does not fall back: on a machine (or a Ray actor given no GPU) where
torch sees none it is an error that says so, not a silent CPU run.
"""

from __future__ import annotations

import re

import torch

DEVICE_SETTINGS = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_setting(setting: str, where: str = "device") -> str:
    """`setting` normalised (lower case, no spaces) when it names a device kind; else a ValueError
    naming `where` and the value."""
    value = str(setting).strip().lower()
    if not _PATTERN.fullmatch(value):
        raise ValueError(f"{where}={setting!r}: expected {DEVICE_SETTINGS}")
    return value


def resolve_device(setting: str, where: str = "device") -> torch.device:
    """The device `setting` names on this machine (see the module docstring)."""
    value = check_device_setting(setting, where)
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if value == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"{where}={setting!r}: torch sees no CUDA device here (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}; in a simulation give each site a GPU share with "
            "ray.client_num_gpus); set device to auto or cpu to train on the CPU"
        )
    device = torch.device(value)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{where}={setting!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


__all__ = ["DEVICE_SETTINGS", "check_device_setting", "resolve_device"]
