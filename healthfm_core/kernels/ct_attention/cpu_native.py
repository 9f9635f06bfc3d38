"""Continuous-time attention on CPU with a small compiled kernel: an optional accelerator.

The matmuls run in torch; ``cpu_native.c`` fuses the elementwise work between them (decay,
mask, softmax; and in the backward dS and the two mixture gradients) into one pass per score
row. The C file is plain C without torch or Python headers: the system C compiler (``$CC``, else
``cc``/``gcc``/``clang``) builds it in about a second on first use, into a per-user cache
(``$HEALTHFM_KERNEL_CACHE``, default ``~/.cache/healthfm/kernels``) keyed by the source, the
flags and the CPU, and ctypes loads it (ctypes releases the GIL, so B*H is split over
``torch.get_num_threads()`` Python threads). Without a compiler, or when the build fails, or
with ``HEALTHFM_CPU_NATIVE=0``, ``native_unavailable_reason`` says why and the dispatcher uses
the pure-PyTorch path (``cpu.py``) instead.

Same contract and results as ``ct_attention_reference`` (computed in fp32, fp64 for fp64
inputs); saves the [B,H,Nq,Nk] probabilities for the backward; no gradient for the times.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from healthfm_core.kernels.ct_attention.contract import AttentionBackend, AttentionCall, astuple_shallow, autocast_off
from healthfm_core.kernels.ct_attention.cpu import check_supported

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_native.c")
DISABLE_ENV = "HEALTHFM_CPU_NATIVE"
CACHE_ENV = "HEALTHFM_KERNEL_CACHE"
# -march=native: the cache key includes the CPU, so a library never runs on another kind.
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120

_lock = threading.Lock()
_loaded: ctypes.CDLL | str | None = None  # the library, or why it is unavailable
_pool: ThreadPoolExecutor | None = None
_pool_key = (0, 0)  # (size, pid): a forked child (DataLoader worker, Ray) gets a pool of its own


def _compiler() -> str | None:
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_fingerprint() -> str:
    """Model and feature flags of this CPU (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(dict.fromkeys(keep))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "healthfm" / "kernels")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"ct_forward_{suffix}")
        real = ctypes.c_float if suffix == "f32" else ctypes.c_double
        fwd.argtypes = [p, p, p, p, p, p, p, real, i64, i64, i64, i64, i64, i32, i64, i64]
        fwd.restype = None
        bwd = getattr(lib, f"ct_backward_{suffix}")
        bwd.argtypes = [p, p, p, p, p, p, p, p, p, real, i64, i64, i64, i64, i64, i32, p, p, i64, i64]
        bwd.restype = None
    return lib


def load_native(compiler: str | None = None, cache_dir: Path | None = None) -> ctypes.CDLL | str:
    """Build (if not cached) and load the kernel library; on failure, a string saying why."""
    cc = compiler or _compiler()
    if cc is None:
        return "no C compiler found (set CC, or install cc/gcc/clang)"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, " ".join(FLAGS).encode(), cc.encode(), _cpu_fingerprint().encode()])
    ).hexdigest()[:16]
    directory = cache_dir or _cache_dir()
    target = directory / f"ct_attention_cpu_{key}.so"
    if not target.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # Build beside the target and rename: concurrent processes never load a partial file.
            with tempfile.TemporaryDirectory(dir=directory) as tmp:
                out = Path(tmp) / target.name
                done = subprocess.run(
                    [cc, *FLAGS, str(SOURCE), "-o", str(out), "-lm"],
                    capture_output=True,
                    text=True,
                    timeout=BUILD_TIMEOUT_S,
                    check=False,
                )
                if done.returncode != 0:
                    return f"{cc} failed on {SOURCE.name} (exit {done.returncode}): {done.stderr.strip()[-500:]}"
                os.replace(out, target)
        except (OSError, subprocess.SubprocessError) as err:
            return f"building {target} with {cc}: {err}"
    try:
        return _declare(ctypes.CDLL(str(target)))
    except (OSError, AttributeError) as err:
        return f"loading {target}: {err}"


def native_unavailable_reason() -> str | None:
    """None when the compiled kernel is ready (built on the first call), else why not."""
    global _loaded
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}"
    with _lock:
        if _loaded is None:
            _loaded = load_native()
            if isinstance(_loaded, str):
                logger.warning("ct_attention: compiled CPU kernel unavailable (%s); using the PyTorch path", _loaded)
    return _loaded if isinstance(_loaded, str) else None


def _library() -> ctypes.CDLL:
    why = native_unavailable_reason()
    if why is not None:
        raise RuntimeError(f"ct_attention_cpu_native: {why}")
    assert isinstance(_loaded, ctypes.CDLL)
    return _loaded


def _split(n: int, kernel: Callable[..., None], *args: object) -> None:
    """kernel(*args, lo, hi) over [0, n) in torch.get_num_threads() contiguous parts, in parallel."""
    global _pool, _pool_key
    threads = min(torch.get_num_threads(), n)
    if threads <= 1:
        kernel(*args, 0, n)
        return
    with _lock:
        if _pool is None or _pool_key[0] < threads or _pool_key[1] != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ct_attention_cpu")
            _pool_key = (threads, os.getpid())
        pool = _pool
    bounds = [round(n * i / threads) for i in range(threads + 1)]
    for f in [pool.submit(kernel, *args, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]:
        f.result()


def _ptr(x: torch.Tensor, dtype: torch.dtype, *shape: int) -> int:
    """The address of x for the C kernel, which reads and writes it as a dense CPU array of
    `dtype` and `shape`: anything else is refused here, before C can write past a buffer."""
    if x.dtype != dtype or tuple(x.shape) != shape or not x.is_contiguous() or x.device.type != "cpu":
        raise RuntimeError(
            f"ct_attention_cpu_native: the kernel needs a contiguous CPU {dtype} array of shape {shape}, "
            f"got {x.dtype} {tuple(x.shape)} (contiguous: {x.is_contiguous()}) on {x.device}"
        )
    return x.data_ptr()


def _chunk_arguments(
    tq: torch.Tensor,
    tk: torch.Tensor,
    valid: torch.Tensor,
    ends: torch.Tensor,
    lw: torch.Tensor,
    lam: torch.Tensor,
    scale: float,
    h: int,
    causal: bool,
) -> tuple[object, ...]:
    """The arguments both kernels take after their own buffers, for a chunk of rows x c keys:
    the times, the key mask, each row's visible keys, the mixture (each checked by ``_ptr``),
    then scale, B, H, rows, c, M, causal."""
    (b, rows), c, m, ct = tq.shape, tk.shape[1], lw.shape[1], lw.dtype
    return (
        _ptr(tq, ct, b, rows),
        _ptr(tk, ct, b, c),
        _ptr(valid, torch.bool, b, c),
        _ptr(ends, torch.int64, b, rows),
        _ptr(lw, ct, h, m),
        _ptr(lam, ct, h, m),
        scale,
        b,
        h,
        rows,
        c,
        m,
        int(causal),
    )


def default_rows(nq: int) -> int:
    """Query rows per chunk: a chunk reads only the keys up to its last query's visible ones, so
    smaller chunks skip more of the causal triangle (8 chunks: ~56% of the square) but make more,
    smaller matmuls; 64 rows at least (measured: 32-128 alike at the model's N ~ 128-256)."""
    return max(64, -(-nq // 8))


def _flat(order: torch.Tensor) -> torch.Tensor:
    """A per-sample order [B,N] as row indices into a [B*N, ...] view."""
    b, n = order.shape
    return (order + torch.arange(b)[:, None] * n).reshape(-1)


def _permute(x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """x [B,H,N,D] with N reordered by ``_flat`` indices, contiguous. index_select over
    [B*N, H*D] rows: ~10x faster than gather with an expanded index."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b * n, h * d).index_select(0, flat).view(b, n, h, d).transpose(1, 2).contiguous()


def _inverse(order: torch.Tensor) -> torch.Tensor:
    n = order.shape[1]
    return torch.empty_like(order).scatter_(1, order, torch.arange(n).expand(order.shape))


class _CTAttentionNative(torch.autograd.Function):
    @staticmethod
    @autocast_off
    def forward(ctx, q, k, v, t_q, t_k, log_weights, rates, key_valid, causal, rows):
        lib = _library()
        ct = torch.float64 if q.dtype == torch.float64 else torch.float32
        suffix = "f64" if ct == torch.float64 else "f32"
        b, h, nq, d = q.shape
        nk, m = k.shape[2], log_weights.shape[1]
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, log_weights.dtype, rates.dtype)
        lw, lam = log_weights.detach().to(ct).contiguous(), rates.detach().to(ct).contiguous()
        # Keys sorted by time, invalid last, and queries by time: the keys a query can see are
        # then a prefix whose length grows with the query, so a chunk of queries reads only the
        # keys before its last query's end (causal: about half the square).
        valid = key_valid.to(torch.bool)
        tk, k_order = torch.sort(torch.where(valid, t_k.detach().to(ct), math.inf), dim=1, stable=True)
        valid = valid.gather(1, k_order)
        tk = torch.where(valid, tk, 0.0)
        tq, q_order = torch.sort(t_q.detach().to(ct), dim=1, stable=True)
        n_valid = valid.sum(1, keepdim=True)
        if causal:
            row_end = torch.minimum(torch.searchsorted(torch.where(valid, tk, math.inf), tq, right=True), n_valid)
        else:
            row_end = n_valid.expand(b, nq)
        q_flat, k_flat = _flat(q_order), _flat(k_order)
        qs = _permute(q.detach().to(ct), q_flat)
        ks = _permute(k.detach().to(ct), k_flat)
        vs = _permute(v.detach().to(ct), k_flat)
        scale = 1.0 / math.sqrt(d)
        kernel = getattr(lib, f"ct_forward_{suffix}")
        chunks, outs = [], []
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            ends = row_end[:, r0:r1].contiguous()
            c1 = int(ends.max()) if b else 0
            tq_c, tk_c, valid_c = tq[:, r0:r1].contiguous(), tk[:, :c1].contiguous(), valid[:, :c1].contiguous()
            probs = torch.matmul(qs[:, :, r0:r1], ks[:, :, :c1].transpose(-1, -2)).contiguous()  # scores -> P
            if c1:
                shared = _chunk_arguments(tq_c, tk_c, valid_c, ends, lw, lam, scale, h, causal)
                _split(b * h, kernel, _ptr(probs, ct, b, h, r1 - r0, c1), *shared)
            outs.append(torch.matmul(probs, vs[:, :, :c1]))
            chunks.append((r0, r1, c1, probs, outs[-1], tq_c, tk_c, valid_c, ends))
        out = (
            _permute(torch.cat(outs, dim=2), _flat(_inverse(q_order)))
            if outs
            else q.new_zeros(b, h, nq, v.shape[-1], dtype=ct)
        )
        ctx.chunks = [c[:3] for c in chunks]
        ctx.meta = (b, h, nq, nk, d, m, causal, suffix, scale)
        ctx.save_for_backward(qs, ks, vs, q_flat, q_order, k_order, lw, lam, *[x for c in chunks for x in c[3:]])
        return out.to(v.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        lib = _library()
        qs, ks, vs, q_flat, q_order, k_order, lw, lam, *flat = ctx.saved_tensors
        b, h, nq, nk, d, m, causal, suffix, scale = ctx.meta
        q_dt, k_dt, v_dt, lw_dt, rate_dt = ctx.dtypes
        needs = ctx.needs_input_grad
        params = bool(needs[5] or needs[6])
        do = _permute(grad_out.to(qs.dtype), q_flat)
        dq = torch.empty_like(qs)
        dk = torch.zeros_like(ks)
        dv = torch.zeros_like(vs)
        # Mixture gradients per chunk and (batch, head): the kernel writes its slots, never adds.
        g_mix = torch.zeros(len(ctx.chunks), 2, b, h, m, dtype=qs.dtype) if params else None
        kernel = getattr(lib, f"ct_backward_{suffix}")
        for i, (r0, r1, c1) in enumerate(ctx.chunks):
            probs, out_c, tq_c, tk_c, valid_c, ends = flat[6 * i : 6 * i + 6]
            do_c = do[:, :, r0:r1]
            deltas = (do_c * out_c).sum(-1)  # [B, H, rows], contiguous
            ds = torch.matmul(do_c, vs[:, :, :c1].transpose(-1, -2)).contiguous()  # dP, then scale * dS
            dv[:, :, :c1] += torch.matmul(probs.transpose(-1, -2), do_c)
            if c1:
                ct, rows_c = qs.dtype, r1 - r0
                p_lw = _ptr(g_mix[i, 0], ct, b, h, m) if g_mix is not None else None
                p_rate = _ptr(g_mix[i, 1], ct, b, h, m) if g_mix is not None else None
                shared = _chunk_arguments(tq_c, tk_c, valid_c, ends, lw, lam, scale, h, causal)
                buffers = (
                    _ptr(ds, ct, b, h, rows_c, c1),
                    _ptr(probs, ct, b, h, rows_c, c1),
                    _ptr(deltas, ct, b, h, rows_c),
                )
                _split(b * h, kernel, *buffers, *shared, p_lw, p_rate)
            dq[:, :, r0:r1] = torch.matmul(ds, ks[:, :, :c1])
            dk[:, :, :c1] += torch.matmul(ds.transpose(-1, -2), qs[:, :, r0:r1])
        dq = _permute(dq, _flat(_inverse(q_order))).to(q_dt)
        k_inverse = _flat(_inverse(k_order))
        dk = _permute(dk, k_inverse).to(k_dt)
        dv = _permute(dv, k_inverse).to(v_dt)
        d_lw = d_rate = None
        if g_mix is not None:
            d_lw, d_rate = g_mix.sum(dim=(0, 2)).unbind(0)  # [H, M] each
            d_lw, d_rate = d_lw.to(lw_dt), d_rate.to(rate_dt)
        return dq, dk, dv, None, None, d_lw, d_rate, None, None, None


class NativeCPUAttention(AttentionBackend):
    """Continuous-time attention with the compiled CPU kernel (same contract as
    ``ct_attention_reference``; no gradient for the times). A RuntimeError when the kernel is
    unavailable (``native_unavailable_reason``). Option ``rows``: query rows per chunk (default
    ``default_rows``)."""

    name = "ct_attention_cpu_native"

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_weights: torch.Tensor) -> str | None:
        return check_supported(q, k, v)

    def unavailable(self, q: torch.Tensor) -> str | None:
        return native_unavailable_reason()

    def run(self, call: AttentionCall, rows: int | None = None) -> torch.Tensor:
        if rows is None:
            rows = default_rows(call.q.shape[2])
        if rows < 1:
            raise ValueError(f"ct_attention_cpu_native: rows must be >= 1, got {rows}")
        out: torch.Tensor = _CTAttentionNative.apply(*astuple_shallow(call), int(rows))
        return out


ct_attention_cpu_native = NativeCPUAttention()
