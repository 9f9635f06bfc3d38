"""A secure-aggregation round's settings, sent by the server (stage 0) and checked by every site.

The settings fix everything the sums need to be correct without looking at any site's values:
who takes part and which groups each holds (the coordinator knows this today), the Shamir
threshold, the clipping a site applies before masking, the largest count a site may weigh with,
and the field. A site parses the config from the server (pydantic) and refuses one whose
arithmetic could wrap the field, because a wrapped sum would be a wrong average, not an error.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from healthfm_core.model.groups import GROUPS

# A count w <= weight_max travels as base-256 digits, each summed on its own: with at most
# MAX_HOLDERS holders a digit's sum stays below 2^16, so the weights' sum is exact in the smallest field.
WEIGHT_DIGIT_BASE = 256
# The most holders a secure round's smallest (16-bit) field holds: 257. The largest value the
# run config's secagg-min-holders and a site policy's secagg_min_holders take.
MAX_HOLDERS = ((1 << 16) - 1) // (WEIGHT_DIGIT_BASE - 1)
# The fewest surviving holders of a group whose sum is opened, by default: the server's
# (run config secagg-min-holders) and each site's own floor (its policy's secagg_min_holders).
# One holder's sum is its update exactly, two holders' each other's by subtraction.
DEFAULT_MIN_HOLDERS = 3
# What a round's masking needs and only the round's arrays fix (the clip norms come from the
# weights' norm): a config sent with the keys of a round ahead (KEY_ROUNDS) may differ from the
# round's own, sent with its mask message, in these fields only. Every other field is fixed when
# the keys are made, and a site refuses a mask message whose config changes one.
MASK_TIME_FIELDS = frozenset({"clip_norm", "value_range", "weight_max"})


class SecAggConfig(BaseModel):
    """Stage 0: what the server sends every sampled site before a secure round."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    round: int = Field(ge=0)
    sample: list[int]  # node ids of the sampled sites, sorted, unique
    groups: dict[int, list[str]]  # node id -> the parameter groups it holds this round
    group_sizes: dict[str, int]  # group -> its number of values (the flattened update's length)
    threshold: int = Field(ge=2)  # t: shares needed to reconstruct a secret; more than half the sample
    min_holders: int = Field(default=DEFAULT_MIN_HOLDERS, ge=1)  # fewer surviving holders: the group is not unmasked
    clip_norm: dict[str, float]  # group -> the L2 norm a site clips its update of the group to
    value_range: dict[str, float]  # group -> c: each value clipped to [-c, c] and quantised there
    weight_max: int = Field(ge=1)  # the round's largest count (local steps x batch size)
    field_bits: Literal[16, 32] = 16  # the masked vector's values are integers mod 2^field_bits

    @model_validator(mode="after")
    def _consistent(self) -> SecAggConfig:
        if self.sample != sorted(set(self.sample)) or len(self.sample) < 2:
            raise ValueError(f"sample {self.sample}: expected at least two sorted, unique node ids")
        if set(self.groups) != set(self.sample):
            raise ValueError("groups: expected one entry per sampled node")
        for node, held in self.groups.items():
            if not held or any(g not in GROUPS for g in held) or len(set(held)) != len(held):
                raise ValueError(f"node {node}: groups {held} (expected distinct groups of {', '.join(GROUPS)})")
        # More than half: the server cannot gather t shares of a site's mask seed from one half of
        # the sample and t of its key from the other (Bell et al. 2020, section 3).
        if not len(self.sample) // 2 < self.threshold <= len(self.sample):
            raise ValueError(f"threshold {self.threshold}: expected in ({len(self.sample) // 2}, {len(self.sample)}]")
        held_groups = {g for held in self.groups.values() for g in held}
        for name, table in (("group_sizes", self.group_sizes), ("clip_norm", self.clip_norm)):
            missing = sorted(held_groups - set(table))
            if missing:
                raise ValueError(f"{name}: no entry for held group(s) {', '.join(missing)}")
        missing = sorted(held_groups - set(self.value_range))
        if missing:
            raise ValueError(f"value_range: no entry for held group(s) {', '.join(missing)}")
        for group in held_groups:
            if self.group_sizes[group] < 1 or not self.clip_norm[group] > 0 or not self.value_range[group] > 0:
                raise ValueError(f"group {group!r}: size, clip_norm and value_range must be positive")
        if len(self.sample) * (WEIGHT_DIGIT_BASE - 1) > self.modulus - 1:
            raise ValueError(f"{len(self.sample)} sites: a weight digit's sum would wrap 2^{self.field_bits}")
        return self

    def key_time_difference(self, other: SecAggConfig) -> list[str]:
        """The fields other than MASK_TIME_FIELDS in which `other` differs from this config."""
        return [
            name
            for name in type(self).model_fields
            if name not in MASK_TIME_FIELDS and getattr(self, name) != getattr(other, name)
        ]

    @property
    def modulus(self) -> int:
        return 1 << self.field_bits

    def holders(self, group: str) -> list[int]:
        """The sampled nodes holding `group`, sorted."""
        return [node for node in self.sample if group in self.groups[node]]

    def levels(self, group: str) -> int:
        """L_g: a value of `group` is quantised to an integer in [0, L_g], L_g = floor((2^bits - 1)
        / (2 x holders)). The holders' largest sum fills half the field and never wraps; the other
        half is headroom where garbage lands (a wrong share, a site sending integers out of range):
        each such value exceeds the bound the server checks with probability about 1/2, so over a
        group's values the check all but surely fires. The price is one bit of resolution."""
        # Flower's quantiser rounds in int32, hence the cap (it binds only for a 32-bit field).
        return min((self.modulus - 1) // (2 * max(1, len(self.holders(group)))), 2**31 - 1)

    def step(self, group: str) -> float:
        """Delta_g = 2 c_g / L_g, the quantisation step of `group`."""
        return 2.0 * self.value_range[group] / self.levels(group)

    @property
    def weight_digits(self) -> int:
        """How many base-256 digits carry a count up to weight_max."""
        digits, top = 1, WEIGHT_DIGIT_BASE
        while top <= self.weight_max:
            digits, top = digits + 1, top * WEIGHT_DIGIT_BASE
        return digits

    def segment_length(self, group: str) -> int:
        """A group's segment of a masked vector: its values, then its weight's digits."""
        return self.group_sizes[group] + self.weight_digits

    def segments(self, node: int) -> list[str]:
        """The groups of `node`'s masked vector, in the order they are laid out (GROUPS order)."""
        return [g for g in GROUPS if g in self.groups[node]]

    def vector_length(self, node: int) -> int:
        return sum(self.segment_length(g) for g in self.segments(node))
