"""DP-SGD for HealthFM at a site: Opacus's optimizer and accountant, Poisson sampling, with per-sample
gradients computed by microbatches of one sample.

Why not Opacus's own per-sample gradient modes:
  - hooks (GradSampleModule) and ghost clipping (GradSampleModuleFastGradientClipping) cover
    only layers with a grad-sample rule and a batch dimension in their input. DecayKernel (the
    continuous-time attention's mixture log-weights and bounded decay rates) takes no input at
    all, and the query / modality / mask tokens are bare nn.Parameters outside any such layer;
  - functorch (vmap over the batch) needs a per-sample function free of data-dependent control
    flow; HealthFM's objectives pick masked positions, visits and anchors per sample (boolean
    indexing, nonzero, variable-length loops), which vmap cannot batch;
  - above all, DP-SGD needs a loss whose gradient splits into one term per sample. HealthFM's
    batch loss does not: losses are batch means combined through log(eps + L) (loss
    balancing), and the InfoNCE alignment contrasts samples against each other. A hook-based
    "per-sample gradient" of that loss would carry other samples' data and the sensitivity
    bound (max_grad_norm) would not hold.
So each sample's gradient is the gradient of the pretraining loss of that sample alone (a batch
of one, a well-defined per-sample objective), exact for every parameter of the model including
DecayKernel. The alignment loss needs two samples and is therefore absent under DP.

Each per-sample gradient is clipped as soon as it is computed and summed into `p.summed_grad`
(memory of one gradient, not batch x parameters); noise, the 1/expected-batch scaling, the
accountant step and the optimizer step are Opacus's DPOptimizer unchanged. Batches are drawn by
Poisson sampling (possibly empty batches), as Opacus's UniformWithReplacementSampler does.

Randomness: neither the sample nor the noise may be predictable from anything a peer knows (the
server's seed, an earlier step). Opacus's `secure_mode` needs torchcsprng, which is not built for
current PyTorch, so each step's noise and each step's Poisson draw come from a fresh CPU
generator whose whole Mersenne-Twister state (624 x 32 bits) is read from os.urandom
(`secret_generator`), never from torch's default generator nor a 64-bit seed; and the noise is
drawn the way Opacus's `secure_mode` draws it (the sum of several Gaussians, against the
floating-point attack on the Gaussian mechanism).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from healthfm_core.data.sequences.batch import Batch
from healthfm_core.model.capabilities import Pretrainable

# Opacus is imported where DP is first used, not with this module: it costs every process that
# imports the site's code ~2 s and ~115 MB (sympy, scipy, torch.distributed), and a run without
# DP never needs it (a simulation's driver and each of its actors import this module).
if TYPE_CHECKING:
    from opacus.accountants import IAccountant
    from opacus.optimizers import DPOptimizer

log = logging.getLogger(__name__)


class DPSettings(BaseModel):
    """The DP parameters of one round at one site (after the site's policy was applied)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    noise_multiplier: float = Field(ge=0)  # 0 (no privacy) only in tests; a site policy needs > 0
    max_grad_norm: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    n_samples: int = Field(gt=0)  # the dataset Poisson sampling draws from
    delta: float = Field(gt=0, lt=1)

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.n_samples


def sample_rate_for(batch_size: int, n_samples: int) -> float:
    """Poisson sampling rate with `batch_size` samples per step in expectation."""
    if n_samples <= 0:
        raise ValueError(f"cannot sample from {n_samples} samples")
    return min(1.0, batch_size / n_samples)


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Noise multiplier that reaches `target_epsilon` after `steps` steps at `sample_rate` (RDP)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, accountant="rdp"
        )
    )


# torch's CPU generator state (ATen CPUGeneratorImplState): seed u64, left i32, seeded i32,
# next u64, state[624] u64 (32-bit words), normal_x/y/rho f64, normal_is_valid i32 (+pad),
# next_float_normal_sample f32, is_next_float_normal_sample_valid bool (+pad).
_STATE_BYTES, _WORDS_AT, _WORDS = 5056, 24, 624
_LEFT_AT, _SEEDED_AT, _NEXT_AT, _DOUBLE_VALID_AT, _FLOAT_VALID_AT = 8, 12, 16, 5040, 5052


def secret_generator() -> torch.Generator:
    """A CPU generator whose whole state comes from os.urandom (19,968 bits, not a 64-bit seed
    that could be searched), with no cached normal sample; where torch's state layout is not the
    one known here, a generator seeded with 64 bits from `secrets`."""
    gen = torch.Generator()
    state = bytearray(gen.get_state().numpy().tobytes())
    if len(state) != _STATE_BYTES:
        log.warning(
            "torch generator state of %d bytes (expected %d): seeding with 64 secret bits", len(state), _STATE_BYTES
        )
        return gen.manual_seed(secrets.randbits(64))
    words = os.urandom(4 * _WORDS)
    for i in range(_WORDS):  # each 32-bit word stored as a little-endian u64
        state[_WORDS_AT + 8 * i : _WORDS_AT + 8 * i + 8] = words[4 * i : 4 * i + 4] + bytes(4)
    state[_LEFT_AT : _LEFT_AT + 4] = (1).to_bytes(4, "little")  # twist the random words before the first draw
    state[_SEEDED_AT : _SEEDED_AT + 4] = (1).to_bytes(4, "little")
    state[_NEXT_AT : _NEXT_AT + 8] = bytes(8)
    state[_DOUBLE_VALID_AT : _DOUBLE_VALID_AT + 4] = bytes(4)
    state[_FLOAT_VALID_AT] = 0
    gen.set_state(torch.frombuffer(state, dtype=torch.uint8).clone())
    if bytes(gen.get_state().numpy().tobytes()[_WORDS_AT : _WORDS_AT + 8 * _WORDS]) != bytes(
        state[_WORDS_AT : _WORDS_AT + 8 * _WORDS]
    ):
        raise RuntimeError("torch did not take the generator state from the OS; refusing to draw DP noise")
    return gen


# ---------------------------------------------------------------------------- data


def empty_like(batch: Batch) -> Batch:
    return batch.rows(slice(0, 0))


def sample_of(batch: Batch, i: int) -> Batch:
    """Sample i of a batch as a batch of one."""
    return batch.rows(slice(i, i + 1))


class PoissonBatches:
    """`steps` Poisson-sampled batches per pass over a map-style dataset of samples (each sample
    included independently with probability `sample_rate`; a batch may be empty). Without a
    `generator` (tests pass one to be reproducible) each batch is drawn from a fresh
    `secret_generator()`."""

    def __init__(
        self, dataset: Dataset, collate: Any, sample_rate: float, steps: int, generator: torch.Generator | None = None
    ) -> None:
        n = len(dataset)  # type: ignore[arg-type]
        if n <= 0 or not 0 < sample_rate <= 1 or steps <= 0:
            raise ValueError(
                f"Poisson batches need samples ({n}), 0 < sample_rate <= 1 ({sample_rate}), steps > 0 ({steps})"
            )
        self.dataset, self.collate = dataset, collate
        self.n, self.sample_rate, self.steps, self.generator = n, sample_rate, steps, generator
        self._empty: Batch | None = None

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self.steps):
            generator = self.generator if self.generator is not None else secret_generator()
            indices = (torch.rand(self.n, generator=generator) < self.sample_rate).nonzero().reshape(-1).tolist()
            if indices:
                yield self.collate([self.dataset[i] for i in indices])
            else:
                if self._empty is None:
                    self._empty = empty_like(self.collate([self.dataset[0]]))
                yield self._empty


# ---------------------------------------------------------------------------- optimizer


def _on_devices(host: list[torch.Tensor], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Host tensors moved each to its partner's device: those bound for one device in one copy."""
    out = list(host)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(like):
        if t.device.type != "cpu":
            by_device.setdefault(t.device, []).append(i)
    for device, idx in by_device.items():
        flat = torch.cat([host[i].reshape(-1) for i in idx]).to(device)
        for i, part in zip(idx, flat.split([host[i].numel() for i in idx])):
            out[i] = part.view(host[i].shape)
    return out


@functools.cache
def streaming_dp_optimizer() -> type[DPOptimizer]:
    """The class StreamingDPOptimizer, built at its first use (Opacus is imported then); also
    `from healthfm_core.privacy.engine import StreamingDPOptimizer`."""
    from opacus.optimizers import DPOptimizer

    class StreamingDPOptimizer(DPOptimizer):
        """Opacus's DPOptimizer with per-sample clipping done as gradients arrive (`accumulate`),
        instead of over a stored [batch, ...] grad_sample per parameter. With `fresh_noise` each
        step's noise comes from a new `secret_generator()`, not from `self.generator`."""

        fresh_noise: bool = False

        def accumulate(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
            """Clip one sample's gradient (one tensor or None per parameter, in `self.params` order)
            to max_grad_norm and add it to p.summed_grad; returns its norm before clipping, a 0-dim
            tensor on the parameters' device. Nothing is read on the host and every step is one
            multi-tensor op, so a GPU does not wait, nor launch per parameter, a sample at a time."""
            pairs = [(p, g.to(p.dtype)) for p, g in zip(self.params, grads) if g is not None]
            if not pairs:
                return torch.zeros((), device=self.params[0].device if self.params else "cpu")
            present = [g for _, g in pairs]
            norm = torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(present)]))
            factor = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)  # Opacus's clip factor
            # Out of place: autograd may hand two parameters the same gradient tensor (a sum's).
            clipped = torch._foreach_mul(present, factor.to(present[0].dtype))
            started = [(p, g) for (p, _), g in zip(pairs, clipped) if p.summed_grad is not None]
            if started:
                torch._foreach_add_([p.summed_grad for p, _ in started], [g for _, g in started])
            for (p, _), g in zip(pairs, clipped):
                if p.summed_grad is None:
                    p.summed_grad = g
            return norm

        @property
        def accumulated_iterations(self) -> int:
            # One batch per optimizer step (no virtual steps): Opacus's accountant hook multiplies
            # the sample rate by this.
            return 1

        def add_noise(self) -> None:
            """Opacus's add_noise, with the noise drawn on the host: Opacus draws it on the
            parameter's device from `self.generator`, which is a CPU generator (its state comes
            from os.urandom, `secret_generator`), so a CUDA parameter would fail in torch.normal. On
            the CPU the draws are Opacus's own; for parameters on a GPU they go there in one copy
            (one wait, not one a parameter)."""
            from opacus.optimizers.optimizer import _check_processed_flag, _generate_noise, _mark_as_processed

            noises = []
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                host = torch.empty(p.summed_grad.shape, dtype=p.summed_grad.dtype)  # its shape and dtype
                noises.append(
                    _generate_noise(
                        std=self.noise_multiplier * self.max_grad_norm,
                        reference=host,
                        generator=self.generator,
                        secure_mode=self.secure_mode,
                    )
                )
            summed = [p.summed_grad for p in self.params]
            for p, g in zip(self.params, torch._foreach_add(summed, _on_devices(noises, summed))):
                p.grad = g.view_as(p)
                _mark_as_processed(p.summed_grad)

        def pre_step(self, closure: Any = None) -> bool:
            for p in self.params:  # an empty batch, or a parameter no sample reached: noise only
                if p.summed_grad is None:
                    p.summed_grad = torch.zeros_like(p)
            if self.fresh_noise:
                self.generator = secret_generator()
            self.add_noise()
            self.scale_grad()
            if self.step_hook:
                self.step_hook(self)
            self._is_last_step_skipped = False
            return True

        def scale_grad(self) -> None:
            if self.loss_reduction == "mean" and self.params:
                torch._foreach_div_([p.grad for p in self.params], self.expected_batch_size)

        def zero_grad(self, set_to_none: bool = False) -> None:
            for p in self.params:
                p.grad_sample = None
                p.summed_grad = None
            self.original_optimizer.zero_grad(set_to_none)

    StreamingDPOptimizer.__qualname__ = "StreamingDPOptimizer"  # pickled by reference, as a module-level class
    return StreamingDPOptimizer


def __getattr__(name: str) -> Any:
    if name == "StreamingDPOptimizer":
        return streaming_dp_optimizer()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class DPLocalStep:
    """The trainer's step under DP-SGD (see `healthfm_core.train.trainer.train_local(local_step=)`):
    wraps the optimizer, then per step computes, clips and sums per-sample gradients.

    noise_generator: None (a site's training) draws each step's noise from a fresh
      `secret_generator()` in Opacus's secure mode; a generator (tests, benchmarks) is used as is.
    max_steps: the steps the ledger reserved for the round; a step beyond them raises before it
      changes any weight.
    """

    def __init__(
        self,
        settings: DPSettings,
        accountant: IAccountant,
        noise_generator: torch.Generator | None = None,
        max_steps: int | None = None,
    ) -> None:
        self.settings = settings
        self.accountant = accountant
        self.noise_generator = noise_generator
        self.max_steps = max_steps
        self.optimizer: DPOptimizer | None = None  # a StreamingDPOptimizer once wrapped

    @property
    def steps_taken(self) -> int:
        """The accountant's steps: the DP steps this local step has noised."""
        return sum(int(s) for *_, s in getattr(self.accountant, "history", []))

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> DPOptimizer:
        """`optimizer` wrapped in a StreamingDPOptimizer with this round's DP settings."""
        s = self.settings
        secure = self.noise_generator is None
        opt = streaming_dp_optimizer()(
            optimizer,
            noise_multiplier=s.noise_multiplier,
            max_grad_norm=s.max_grad_norm,
            expected_batch_size=max(1, round(s.expected_batch_size)),
            loss_reduction="mean",
            generator=self.noise_generator,
            secure_mode=secure,
        )
        opt.fresh_noise = secure
        # Opacus's own hook: one accountant step per optimizer step, at this round's rate.
        account = self.accountant.get_optimizer_hook_fn(sample_rate=s.sample_rate)

        def hook(optimizer: DPOptimizer) -> None:
            # The hook runs after the noise, before the parameters change.
            if self.max_steps is not None and self.steps_taken >= self.max_steps:
                raise RuntimeError(
                    f"DP step {self.steps_taken + 1} exceeds the {self.max_steps} steps reserved in the privacy ledger"
                )
            account(optimizer)

        opt.attach_step_hook(hook)
        self.optimizer = opt
        return opt

    def __call__(
        self, model: torch.nn.Module, batch: Batch, weights: Any, generator: torch.Generator
    ) -> tuple[dict[str, float], float]:
        """Fill p.summed_grad for one step; returns (mean per-sample losses, mean per-sample norm)."""
        if self.optimizer is None:
            raise RuntimeError("DPLocalStep: wrap_optimizer must be called before the first step")
        if not isinstance(model, Pretrainable):
            raise TypeError(f"DPLocalStep: model {type(model).__name__} has no pretraining_losses method")
        params = self.optimizer.params
        # Each sample's losses and norm stay on the device until the batch is done and are read
        # then, at once: a GPU step does not wait for the host a sample at a time. A non-finite
        # loss is refused then, before the optimizer step (its gradient is in summed_grad, which
        # the next step's zero_grad clears; nothing was noised, released or accounted).
        per_sample: list[dict[str, torch.Tensor]] = []
        norms: list[torch.Tensor] = []
        for i in range(batch.batch_size):
            losses = model.pretraining_losses(sample_of(batch, i), weights, generator=generator)
            grads = torch.autograd.grad(losses["total"], params, allow_unused=True)
            norms.append(self.optimizer.accumulate(list(grads)))
            per_sample.append({k: v.detach().float() for k, v in losses.items()})
        if not per_sample:
            return {"total": 0.0}, 0.0
        return _read_batch(per_sample, norms)


def _read_batch(per_sample: list[dict[str, torch.Tensor]], norms: list[torch.Tensor]) -> tuple[dict[str, float], float]:
    """(mean per-sample losses, mean per-sample norm) of a DP step, read from the device at once;
    a FloatingPointError naming the first sample whose total is not finite."""
    names = sorted({k for losses in per_sample for k in losses})
    zero = torch.zeros((), device=norms[0].device)
    table = torch.stack([torch.stack([losses.get(k, zero) for k in names]) for losses in per_sample])  # [B, K]
    values = torch.cat([table.reshape(-1), torch.stack(norms).float().to(table.device)]).tolist()  # the one read
    rows = [values[i * len(names) : (i + 1) * len(names)] for i in range(len(per_sample))]
    for i, row in enumerate(rows):
        if not math.isfinite(row[names.index("total")]):
            seen = {k: row[j] for j, k in enumerate(names) if k in per_sample[i]}
            raise FloatingPointError(f"non-finite loss on sample {i} of {len(rows)}: {seen}")
    n = len(rows)
    means = {k: sum(row[j] for row in rows) / n for j, k in enumerate(names)}
    return means, sum(values[n * len(names) :]) / n


__all__ = [
    "DPLocalStep",
    "DPSettings",
    "PoissonBatches",
    "StreamingDPOptimizer",  # noqa: F822 (module __getattr__ builds it at first use)
    "noise_for_target",
    "sample_of",
    "sample_rate_for",
    "secret_generator",
    "streaming_dp_optimizer",
]
