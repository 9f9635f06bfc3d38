"""A torch model's parameters per group (the groups by name: healthfm_core/terms/groups.py)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from healthfm_core.terms.groups import GROUPS, check_groups, parameter_group


def group_parameters(model: nn.Module, groups: Iterable[str]) -> list[nn.Parameter]:
    """The parameters of `model` in `groups` (e.g. for an optimizer that trains only those)."""
    wanted = check_groups(groups)
    return [p for name, p in model.named_parameters() if parameter_group(name) in wanted]


def group_sizes(model: nn.Module) -> dict[str, int]:
    """Number of parameter elements per group."""
    sizes = dict.fromkeys(GROUPS, 0)
    for name, p in model.named_parameters():
        sizes[parameter_group(name)] += p.numel()
    return sizes
