"""Parameter groups by name: which part of the model a state_dict key belongs to (no torch: the
wire protocol and the server read it; the model's own parameters per group: model/groups.py).

A site trains, sends and receives only the groups it has data for; the server averages each key
over the sites that hold its group. The group follows from the key alone, through an explicit
table of module prefixes; a key that matches no prefix is an error, never silently "shared".

  shared     backbone.*            (blocks with their decay kernels, query token, age embedding, final norm)
  ehr        ehr_encoder.*, heads.ehr_*
  wearables  wearable_encoder.*, heads.wear_*   (incl. the wearable->EHR predictive and alignment
                                                 heads: only a site with wearables trains them)
  genomics   genomics_encoder.*, heads.prs_*
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

GROUPS: tuple[str, ...] = ("shared", "ehr", "wearables", "genomics")

_PREFIX_GROUPS: tuple[tuple[str, str], ...] = (
    ("backbone.", "shared"),
    ("ehr_encoder.", "ehr"),
    ("heads.ehr_", "ehr"),
    ("wearable_encoder.", "wearables"),
    ("heads.wear_", "wearables"),
    ("genomics_encoder.", "genomics"),
    ("heads.prs_", "genomics"),
)

# The modality encoders (what turns a modality's raw input into tokens), each inside its group:
# what DP trains when a run asks to train only the parameters that must move (issue 68: at the
# evidence job's budget the whole gain of pretraining over the initialisation came from the EHR
# encoder; the backbone and the heads trained alone gave none of it).
ENCODER_PREFIXES: tuple[str, ...] = ("ehr_encoder.", "wearable_encoder.", "genomics_encoder.")

# Wrappers prepend these to keys (torch.compile, DataParallel/DDP, Opacus GradSampleModule).
_WRAPPER_PREFIXES = ("_orig_mod.", "module._module.", "_module.", "module.")

V = TypeVar("V")


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                stripped = True
    return key


def parameter_group(key: str) -> str:
    """The group ("shared", "ehr", "wearables" or "genomics") of a HealthFM state_dict key."""
    bare = _strip_wrappers(key)
    for prefix, group in _PREFIX_GROUPS:
        if bare.startswith(prefix):
            return group
    raise KeyError(
        f"state_dict key {key!r} belongs to no parameter group: known prefixes are "
        f"{', '.join(p for p, _ in _PREFIX_GROUPS)} (add the module to healthfm_core/terms/groups.py)"
    )


def is_encoder(key: str) -> bool:
    """Whether a HealthFM state_dict key is a modality encoder's (ENCODER_PREFIXES)."""
    return _strip_wrappers(key).startswith(ENCODER_PREFIXES)


def check_groups(groups: Iterable[str]) -> frozenset[str]:
    """`groups` as a set; ValueError naming any that is not a group."""
    wanted = frozenset(groups)
    unknown = wanted - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown parameter group(s) {sorted(unknown)}; groups are {list(GROUPS)}")
    return wanted


def group_state_dict(state_dict: Mapping[str, V], groups: Iterable[str]) -> dict[str, V]:
    """The entries of `state_dict` whose key belongs to one of `groups` (order kept)."""
    wanted = check_groups(groups)
    return {key: value for key, value in state_dict.items() if parameter_group(key) in wanted}
