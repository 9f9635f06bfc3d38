"""How arrays travel: the one place the wire encoding of both directions is spelled. The uplink
(a site's trained arrays to the server): the site encodes with `encode_update`, the server
decodes with `decode_update`, which treats a reply as untrusted input. The downlink (the global
arrays to the sites): `downlink_arrays` and `onto_master`, below the uplink's.

Transports (RoundConfig.transport, FederationConfig.transport):
  fp32  the arrays as trained (their own dtype).
  fp16  floating arrays cast to float16; the server upcasts before averaging (2 bytes a value).
  int8  per floating tensor, its update d = trained - received (the array the server sent this
        round, which the server still holds as the round's global array) travels as
        q = round(d / s) in int8 [-127, 127] with one positive scale s = max|d| / 127 per tensor,
        in the reply's MetricRecord SCALES_RECORD {key: s}; the server rebuilds received + s * q
        (1 byte a value). Arrays that are not floating travel as they are.

Why symmetric (one scale, no offset): an update is centred on zero, so an offset buys at most
one bit on a lopsided tensor, while symmetric keeps zero exact (an unchanged weight stays
unchanged), decodes with one multiply, and leaves one number per tensor to validate. Why the
update and not the weights: the weights' range is set by their magnitude, a round's change is
orders of magnitude smaller, so a step of max|w| / 127 would drown it.

Rounding: `stochastic` (default) rounds up with probability equal to the fraction, so each
round's message is unbiased (E[s q] = d), even for a site that never comes back; `nearest` is
within s/2 of d. Error feedback (default on): the site adds what its previous int8 message left
out (the residual r = d + r_prev - s q) to its next update, so the error does not accumulate over
rounds. The residual lives in the site's per-run state (the ClientApp's Context.state, which
never travels to the server) and is discarded with the run.

Privacy: encoding happens after training (and after any DP mechanism) on the released weights;
it is post-processing of the DP output (its randomness and the residual depend on no data but
that output), so it costs no privacy budget.

Downlinks (FederationConfig.downlink; train messages only, evaluation always gets the global arrays
as they are):
  fp32  the global arrays as they are.
  fp16  each floating tensor whose values float16 holds (finite, |x| <= 65504) cast to float16,
        the others as they are (2 bytes a value). The server keeps the float32 global as the
        *master* copy, as mixed-precision training keeps fp32 master weights: the round runs
        against what the sites received (`received`: the float16 values back in the tensor's
        dtype, the very values a site's model loads), every reply is judged, bounded and averaged
        against it, and the round's result moves onto the master (`onto_master`: new + (master -
        received)), so the rounding never accumulates over rounds and a group no reply updates
        keeps its master values to the bit. A site trains from weights within 2^-11 of each
        value (float16's relative rounding), or within 3e-8 below 6.1e-5, where float16 is
        subnormal (values below 3e-8 become 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, get_args

import numpy as np

Transport = Literal["fp32", "fp16", "int8"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)
Downlink = Literal["fp32", "fp16"]
DOWNLINKS: tuple[str, ...] = get_args(Downlink)
FP16_MAX = float(np.finfo(np.float16).max)  # 65504: a larger value would travel as Inf
Rounding = Literal["stochastic", "nearest"]
ROUNDINGS: tuple[str, ...] = get_args(Rounding)

SCALES_RECORD = "scales"  # MetricRecord of an int8 reply: state_dict key -> its scale
INT8_MAX = 127  # symmetric range: -128 is never sent (and refused on receipt)
# An all-zero update has no range; any positive scale encodes it exactly (q = 0).
_ZERO_SCALE = 1.0


class Encoded(NamedTuple):
    """A site's arrays as they leave it."""

    arrays: dict[str, np.ndarray]  # the ArrayRecord's arrays (int8, float16 or as trained)
    scales: dict[str, float] | None  # int8: the MetricRecord SCALES_RECORD; else None
    residual: dict[str, np.ndarray]  # int8 with error feedback: what this message left out (stays at the site)


def quantise(x: np.ndarray, rounding: Rounding, rng: np.random.Generator | None = None) -> tuple[np.ndarray, float]:
    """x (any float array) as int8 values in [-127, 127] and one positive scale: s * q ~ x."""
    x64 = np.asarray(x, dtype=np.float64)
    peak = float(np.max(np.abs(x64))) if x64.size else 0.0
    if not math.isfinite(peak):
        raise ValueError(f"cannot quantise an array holding NaN or Inf (max |x| = {peak})")
    scale = peak / INT8_MAX if peak > 0 else _ZERO_SCALE
    if scale == 0.0:  # peak below the smallest float64 that / 127 keeps positive
        scale = _ZERO_SCALE
    y = x64 / scale
    if rounding == "nearest":
        q = np.rint(y)
    elif rounding == "stochastic":
        if rng is None:
            raise ValueError("stochastic rounding needs a random generator")
        low = np.floor(y)
        q = low + (rng.random(y.shape) < (y - low))
    else:
        raise ValueError(f"rounding {rounding!r}: expected one of {', '.join(ROUNDINGS)}")
    return np.clip(q, -INT8_MAX, INT8_MAX).astype(np.int8), scale


def dequantise(reference: np.ndarray, q: np.ndarray, scale: float) -> np.ndarray:
    """reference + scale * q in the reference's dtype: what the server rebuilds (the site uses the
    same function for its residual, so both sides agree to the bit)."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes Inf, refused by the caller
        value = np.asarray(reference, dtype=np.float64) + float(scale) * q.astype(np.float64)
        return value.astype(reference.dtype)


def encode_update(
    trained: Mapping[str, np.ndarray],
    received: Mapping[str, np.ndarray],
    transport: Transport,
    *,
    rounding: Rounding = "stochastic",
    rng: np.random.Generator | None = None,
    residual: Mapping[str, np.ndarray] | None = None,
) -> Encoded:
    """The site's trained arrays in `transport`. int8 needs `received` (the arrays this round's
    message carried) for every floating key; `residual` (error feedback; None: off) is what the
    previous int8 message left out, by key (entries whose shape does not fit are ignored)."""
    if transport == "fp32":
        return Encoded({k: np.asarray(v) for k, v in trained.items()}, None, {})
    if transport == "fp16":
        arrays = {k: (v.astype(np.float16) if _floating(v) else np.asarray(v)) for k, v in trained.items()}
        return Encoded(arrays, None, {})
    if transport != "int8":
        raise ValueError(f"transport {transport!r}: expected one of {', '.join(TRANSPORTS)}")
    arrays, scales, left = {}, {}, {}
    for key, value in trained.items():
        value = np.asarray(value)
        if not _floating(value):
            arrays[key] = value
            continue
        if key not in received or np.shape(received[key]) != value.shape:
            raise ValueError(f"int8 transport: key {key!r} has no received array of shape {value.shape}")
        reference = np.asarray(received[key])
        target = value.astype(np.float64)
        update = target - reference.astype(np.float64)
        carried = residual.get(key) if residual is not None else None
        if carried is not None and np.shape(carried) == value.shape:
            update = update + np.asarray(carried, dtype=np.float64)
        q, scale = quantise(update, rounding, rng)
        arrays[key], scales[key] = q, scale
        if residual is not None:
            sent = dequantise(reference, q, scale).astype(np.float64) - reference.astype(np.float64)
            left[key] = (update - sent).astype(np.float32)
    return Encoded(arrays, scales, left)


def wire_dtype_ok(wire: str, expected: np.dtype) -> bool:
    """Whether an array announced as dtype `wire` may stand for one of dtype `expected` (checked
    on the header, before the payload is decoded)."""
    if wire == str(expected):
        return True
    return wire in ("float16", "int8") and np.issubdtype(expected, np.floating)


def decode_update(
    arrays: Mapping[str, np.ndarray],
    scales: Mapping[str, Any] | None,
    reference: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """A reply's arrays in the reference's dtypes; `reference` holds the arrays sent this round.

    Raises ValueError naming the key and the problem: an unknown key, a shape or dtype that does
    not fit, an int8 array without its scale, a scale that is not a finite positive number, a
    scale for no int8 array, an int8 value of -128, or a rebuilt value that overflows."""
    scales = dict(scales) if scales is not None else None
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        if key not in reference:
            raise ValueError(f"unknown key {key!r}")
        expected = np.asarray(reference[key])
        value = np.asarray(value)
        if value.shape != expected.shape:
            raise ValueError(f"key {key!r}: shape {value.shape} != {expected.shape}")
        if value.dtype == expected.dtype:
            out[key] = value
        elif value.dtype == np.float16 and _floating(expected):
            out[key] = value.astype(expected.dtype)  # fp16 transport: upcast before any arithmetic
        elif value.dtype == np.int8 and _floating(expected):
            if scales is None:
                raise ValueError(f"key {key!r}: int8 array but the reply has no {SCALES_RECORD!r} record")
            if key not in scales:
                raise ValueError(f"key {key!r}: int8 array without its scale in {SCALES_RECORD!r}")
            scale = _scale(key, scales[key])
            if value.size and int(value.min()) < -INT8_MAX:
                raise ValueError(f"key {key!r}: int8 value {int(value.min())} outside [-{INT8_MAX}, {INT8_MAX}]")
            decoded = dequantise(expected, value, scale)
            if not np.isfinite(decoded).all():
                raise ValueError(f"key {key!r}: scale {scale:.3g} x int8 values overflows {expected.dtype}")
            out[key] = decoded
        else:
            raise ValueError(
                f"key {key!r}: dtype {value.dtype} != {expected.dtype} (nor float16, nor int8 with a scale)"
            )
    if scales is not None:
        stray = sorted(k for k in scales if k not in arrays or np.asarray(arrays[k]).dtype != np.int8)
        if stray:
            raise ValueError(f"{SCALES_RECORD}: scale for key {stray[0]!r}, which the reply holds no int8 array of")
    return out


class Downlinked(NamedTuple):
    """The global arrays as a round's train messages carry them, and as the sites read them."""

    wire: dict[str, np.ndarray]  # what the messages carry (float16 where the downlink casts)
    received: dict[str, np.ndarray]  # what a site loads: the wire values back in each tensor's dtype


def downlink_arrays(arrays: Mapping[str, np.ndarray], downlink: Downlink) -> Downlinked:
    """The global `arrays` in `downlink` (the module docstring): a floating tensor goes as float16
    when every value of it is finite and within float16's range, else as it is."""
    if downlink == "fp32":
        same = {k: np.asarray(v) for k, v in arrays.items()}
        return Downlinked(same, same)
    if downlink != "fp16":
        raise ValueError(f"downlink {downlink!r}: expected one of {', '.join(DOWNLINKS)}")
    wire, received = {}, {}
    for key, value in arrays.items():
        value = np.asarray(value)
        fits = _floating(value) and value.dtype.itemsize > 2 and _within_fp16(value)
        wire[key] = value.astype(np.float16) if fits else value
        received[key] = wire[key].astype(value.dtype) if fits else value
    return Downlinked(wire, received)


def onto_master(
    new: Mapping[str, np.ndarray], master: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """A round's result `new`, computed against what the sites `received`, moved onto the server's
    `master` arrays: new + (master - received) per key. master - received is exact in floating
    point (the two are within a factor of two, or received is 0), so a key the round left at its
    received values comes back as the master's, to the bit. Keys sent as they are (the master's
    own arrays, or values float16 holds exactly) come back as `new` itself."""
    out: dict[str, np.ndarray] = {}
    for key, value in new.items():
        m, r = np.asarray(master[key]), np.asarray(received[key])
        residual = m - r if r is not m and _floating(m) else None
        if residual is None or not residual.any():
            out[key] = np.asarray(value)
        else:
            out[key] = np.asarray(value, dtype=m.dtype) + residual
    return out


def _within_fp16(value: np.ndarray) -> bool:
    if not value.size:
        return True
    peak = float(np.max(np.abs(value)))
    return math.isfinite(peak) and peak <= FP16_MAX


def _scale(key: str, value: Any) -> float:
    # A MetricRecord value may be an int, a float or a list of them; only a number is a scale.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"key {key!r}: scale {str(value)[:40]!r} is not a number")
    scale = float(value)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"key {key!r}: scale {scale!r} is not a finite positive number")
    return scale


def _floating(value: np.ndarray) -> bool:
    return bool(np.issubdtype(np.asarray(value).dtype, np.floating))


__all__ = [
    "DOWNLINKS",
    "FP16_MAX",
    "INT8_MAX",
    "ROUNDINGS",
    "SCALES_RECORD",
    "TRANSPORTS",
    "Downlink",
    "Downlinked",
    "Encoded",
    "Rounding",
    "Transport",
    "decode_update",
    "dequantise",
    "downlink_arrays",
    "encode_update",
    "onto_master",
    "quantise",
    "wire_dtype_ok",
]
