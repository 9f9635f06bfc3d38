"""A site's update of one group as integers of the field, and the sums back as an average.

Site (`encode_segment`): the update x (float, one group) is checked and clipped first, because
after masking nobody can: non-finite values are refused, the norm is clipped to the round's C_g,
then each value to [-c_g, c_g]. With its count w (an integer in [1, W], W = weight_max) and
a = w / W, the site quantises y = a x with Flower's stochastic quantiser onto {0, ..., L_g}
(step Delta_g = 2 c_g / L_g, value = q Delta_g - c_g) and appends w as base-256 digits.

Server (`decode_sums`): with n_g holders in the sum, S = sum q and the digits' sums give
sum_k (q_k Delta_g - c_g) = S Delta_g - n_g c_g and the exact total weight W_g = sum_k w_k; the
average is W (S Delta_g - n_g c_g) / W_g.

Error bound (per value, of the average against sum_k w_k x_k / W_g on the same clipped updates):
stochastic rounding leaves each site's e_k = (q_k Delta_g - c_g) - y_k in (-Delta_g, Delta_g),
so the average is off by W |sum_k e_k| / W_g < n_g W Delta_g / W_g = Delta_g / a_mean, with
a_mean = W_g / (n_g W) the holders' mean count fraction: below Delta_g = 2 c_g / L_g when every
holder trains the full round (w = W). L_g = floor((2^bits - 1) / (2 x holders in the sample)), so
the largest sum fits half the field (config.py says why half): e.g. 16 bits, 4 holders: L = 8191,
Delta = 2 c / 8191 (int8's step is 2 max|d| / 254 per tensor). The rounding
is unbiased (E e_k = 0), so the typical error is ~ Delta_g sqrt(n_g) / (sqrt(6) n_g a_mean).
"""

from __future__ import annotations

import numpy as np
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from secure_aggregation.config import WEIGHT_DIGIT_BASE, SecAggConfig
from secure_aggregation.errors import SecAggError, SecAggRefusal
from secure_aggregation.masks import field_dtype


def clip_update(values: np.ndarray, clip_norm: float, value_range: float) -> np.ndarray:
    """The site's checks before masking: refuse NaN/Inf; clip the L2 norm to clip_norm, then each
    value to [-value_range, value_range] (after masking the server cannot check a single reply)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise SecAggRefusal(f"update holds {int((~np.isfinite(values)).sum())} non-finite value(s): not masked")
    norm = float(np.linalg.norm(values))
    if norm > clip_norm:
        values = values * (clip_norm / norm)
    return np.clip(values, -value_range, value_range)


def weight_digits(weight: int, digits: int) -> np.ndarray:
    return np.array([(weight // WEIGHT_DIGIT_BASE**i) % WEIGHT_DIGIT_BASE for i in range(digits)], dtype=np.int64)


def encode_segment(values: np.ndarray, weight: int, config: SecAggConfig, group: str) -> np.ndarray:
    """One group's segment of a masked vector, before masking: L_g-level quantisation of
    (w / W) x (x already clipped), then w's digits; integers of the field."""
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer) or not 1 <= weight <= config.weight_max:
        raise SecAggRefusal(f"group {group!r}: count {weight!r} is not an integer in [1, {config.weight_max}]")
    if values.shape != (config.group_sizes[group],):
        raise SecAggRefusal(f"group {group!r}: {values.size} values, the round expects {config.group_sizes[group]}")
    scaled = values * (int(weight) / config.weight_max)
    (q,) = quantize([scaled], config.value_range[group], config.levels(group))
    dtype = field_dtype(config.field_bits)
    return np.concatenate([q.astype(dtype), weight_digits(int(weight), config.weight_digits).astype(dtype)])


def decode_sums(segment_sum: np.ndarray, holders: int, config: SecAggConfig, group: str) -> tuple[np.ndarray, int]:
    """The holders' weighted average update of `group` (float64) and their total count, from
    the unmasked sum of their segments. Refuses (SecAggError) a sum outside what `holders`
    honest segments can add up to: a wrong share or a site that sent out-of-range integers."""
    size, levels = config.group_sizes[group], config.levels(group)
    values = segment_sum[:size].astype(np.int64)
    digits = segment_sum[size:].astype(np.int64)
    over = int((values > holders * levels).sum())
    if over or (digits > holders * (WEIGHT_DIGIT_BASE - 1)).any():
        raise SecAggError(
            f"group {group!r}: unmasked sum outside its bound ({over} of {size} values above {holders} x {levels}); "
            "a share did not reconstruct or a site sent integers outside the round's range"
        )
    total = int(sum(int(d) * WEIGHT_DIGIT_BASE**i for i, d in enumerate(digits)))
    if not holders <= total <= holders * config.weight_max:
        raise SecAggError(f"group {group!r}: total count {total} outside [{holders}, {holders * config.weight_max}]")
    # Flower's dequantize maps one quantised value back (q Delta - c); a sum of n carries n offsets.
    (summed,) = dequantize([values], config.value_range[group], levels)
    summed = summed - (holders - 1) * config.value_range[group]
    mean = summed * (config.weight_max / total)
    if not np.isfinite(mean).all():
        raise SecAggError(f"group {group!r}: the average is not finite")
    return mean, total


def error_bound(config: SecAggConfig, group: str, holders: int, total_weight: int) -> float:
    """The largest per-value difference between the secure average and the plain weighted average
    of the same clipped updates: Delta_g n_g W / W_g (see the module's docstring)."""
    return config.step(group) * holders * config.weight_max / total_weight
