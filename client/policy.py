"""The site's own policy: a file the site's admin owns, enforced by the client whatever the
server asks.

Example (YAML or JSON; every key optional except where noted):

    min_subjects: 20            # no metric or statistic on fewer subjects leaves the site
    min_positives: 10           # no metric whose held-out split has fewer positives (or negatives)
    groups_allowed: [shared, ehr, wearables]   # parameter groups whose weights may leave
    dp:
      mandatory: true           # train only with DP, even if the server does not ask for it
      epsilon_cap: 8.0          # required: total epsilon over every round of every run
      delta: 1.0e-5             # required
      max_grad_norm: 1.0
      noise_multiplier: 1.1     # or target_epsilon (the epsilon one run's planned steps may reach)
    approved_apps:              # sha256 of each app bundle (.fab) this site runs; no other runs here
      - 3f7a...                 # added by `client.py approve BUNDLE.fab --policy FILE` (client/deploy/approval.py)
    require_secure_aggregation: true   # train only in rounds whose update leaves masked (SecAgg+)
    secagg_min_holders: 3       # the fewest holders of a group for which this site takes part in
                                # opening its sum, whatever the run config's secagg-min-holders
    threads: 4                  # torch threads of the site's training (default: its free cores,
                                # client/threads.py); `join --threads N` overrides it
    expected_release:           # the run whose release this site uses (embed, probe, predict, the
      run_id: 9204379387354967851   # task head): another run's release is refused by name
      setup_sha256: 5c0f...     # (either or both; healthfm_core/release_binding.py)

The `dp:` section is healthfm_core.privacy.policy.DPPolicy (numbers strict and finite;
epsilon_cap at most EPSILON_CAP_MAX = 100; delta at most 1/n when the caller passes n, the site's
train subjects).

The file is read strictly (healthfm_core/strict_files.py): a duplicated key (two `dp:` blocks)
is refused, a boolean is `true` or `false` only (`yes`, `on` are refused), numbers are YAML 1.2's
(`1e-5`, `5e0` are numbers, not strings; `020` and `1:00`, which YAML 1.1 reads otherwise, are
refused) and merge keys (`<<`) are refused. Every number has a range, checked
here (docs/site-admin.md, "Write your policy").
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from healthfm_core.model.groups import GROUPS
from healthfm_core.privacy.policy import TRAIN_SUBJECTS, DPPolicy
from healthfm_core.release_binding import ExpectedRun
from healthfm_core.strict_files import StrictFileError, strict_json, strict_yaml
from secure_aggregation.config import DEFAULT_MIN_HOLDERS, MAX_HOLDERS

SHA256_HEX = re.compile(r"[0-9a-f]{64}")

# The ranges of the policy's numbers (docs/site-admin.md): generous, but a typo is refused.
MAX_SUBJECTS = 1_000_000  # min_subjects, min_positives: more than any site holds
MAX_THREADS = 1024  # threads: more cores than a site's machine has


class PolicyError(ValueError):
    """A policy file that cannot be read or validated; the message names file, field and value."""


class SitePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_subjects: int = Field(default=10, ge=1, le=MAX_SUBJECTS, strict=True)
    # Raises the runtime's min_report_positives (the stricter holds): a held-out split with fewer
    # positive (or negative) rows gives no metric, since a metric on a few cases describes them.
    min_positives: int = Field(default=1, ge=1, le=MAX_SUBJECTS, strict=True)
    groups_allowed: list[str] = Field(default_factory=lambda: list(GROUPS))
    dp: DPPolicy | None = None
    approved_apps: list[str] = Field(default_factory=list)  # app bundle sha256s (client/deploy/app_guard.py)
    # torch threads of the ClientApp (client/threads.py); None: the cores free when it starts.
    # Strict: "4", 4.0 or true are refused, not read as a number.
    threads: int | None = Field(default=None, ge=1, le=MAX_THREADS, strict=True)
    # Refuse any round whose update would leave the site in the clear (the run config's
    # `secure-aggregation` off): the coordinator then sees only sums over at least min_holders sites.
    require_secure_aggregation: bool = Field(default=False, strict=True)
    # The site's own floor under secure aggregation (secure_aggregation/site.py): it takes part in
    # no round whose config lets the server open a group over fewer holders (the run config's
    # secagg-min-holders may raise it, never lower it), and reveals no share for such a group.
    # 1 would let a group one site holds be opened: that site's update exactly. The default: a sum
    # over fewer than 3 is one or two sites' updates; the most: what a 16-bit field holds.
    secagg_min_holders: int = Field(default=DEFAULT_MIN_HOLDERS, ge=1, le=MAX_HOLDERS, strict=True)
    # The run whose release this site uses (healthfm_core/release_binding.py): `client.py embed |
    # probe | predict` and the task-head ClientApp refuse a release of another run. None: any
    # release the federation signed loads, with a warning naming its run.
    expected_release: ExpectedRun | None = None

    @field_validator("approved_apps")
    @classmethod
    def _sha256s(cls, v: list[str]) -> list[str]:
        bad = [h for h in v if not isinstance(h, str) or not SHA256_HEX.fullmatch(h)]
        if bad:
            raise ValueError(
                f"{bad} are not sha256 digests (64 lowercase hex characters); add bundles with "
                "`client.py approve BUNDLE.fab --policy FILE`"
            )
        return list(dict.fromkeys(v))

    @field_validator("groups_allowed")
    @classmethod
    def _known_groups(cls, v: list[str]) -> list[str]:
        unknown = [g for g in v if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown group(s) {unknown}; groups are {list(GROUPS)}")
        return list(dict.fromkeys(v))

    def allows(self, group: str) -> bool:
        return group in self.groups_allowed


def load_policy(path: str | Path, train_subjects: int | None = None) -> SitePolicy:
    """Read and validate a policy file (.yaml/.yml or .json). With `train_subjects` (the site's
    train-split subject count, when the caller knows it) a DP delta above 1/n is refused too."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as err:
        raise PolicyError(f"{path}: cannot read the site policy ({err.strerror or err})") from None
    try:
        data = strict_json(text, path) if path.suffix.lower() == ".json" else strict_yaml(text, path)
    except StrictFileError as err:
        raise PolicyError(f"invalid site policy: {err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: the policy must be a mapping of fields, got {type(data).__name__}")
    try:
        context = {TRAIN_SUBJECTS: train_subjects} if train_subjects is not None else None
        return SitePolicy.model_validate(data, context=context)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            field = ".".join(str(x) for x in e["loc"]) or "(policy)"
            value = "(missing)" if e["type"] == "missing" else repr(e.get("input"))
            problems.append(f"{path}: field {field}: value {value}: {e['msg']}")
        raise PolicyError("invalid site policy:\n  " + "\n  ".join(problems)) from None


__all__ = ["MAX_THREADS", "DPPolicy", "PolicyError", "SitePolicy", "load_policy"]
