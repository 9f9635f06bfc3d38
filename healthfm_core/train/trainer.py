"""The local training loop: the centralized baseline runs it once, a federated site once per round.

It knows nothing of federation: it trains the parameters of the chosen parameter groups of a
model on an iterable of batches for a number of steps, and hands back the per-step losses, the
trained groups' weights and the state needed to continue (optimizer, data position, RNG).

Model-side randomness (masking, modality dropout) draws from a torch.Generator seeded from
(seed, step) at every step, so a step's masks depend only on the seed and the step number:
a resumed run draws exactly what the uninterrupted run drew. A federated site should therefore
vary `seed` per round (e.g. from the run seed, round and site) so rounds do not repeat masks.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from healthfm_core.data.sequences.batch import Batch
from healthfm_core.model.attention import decay_rate_range
from healthfm_core.model.capabilities import Pretrainable
from healthfm_core.terms.groups import GROUPS, group_state_dict, parameter_group
from healthfm_core.terms.objective_weights import ObjectiveWeights
from healthfm_core.train.checkpoint import (
    TrainState,
    checkpoint_name,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from healthfm_core.train.weight_cast import linear_weights_cast_once

log = logging.getLogger(__name__)

GROUP_OF_MODALITY = {"ehr": "ehr", "wearables": "wearables", "genomics": "genomics"}


class TrainConfig(BaseModel):
    """How to train. `steps` is the total step count: a run covers steps start_step .. steps-1,
    and the learning-rate schedule is laid over 0 .. steps."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(gt=0)
    lr: float = Field(default=3e-4, gt=0)
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(default=1.0, gt=0)
    batch_size: int = Field(default=32, gt=0)  # for the caller's loader; the loop takes batches as they come
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    warmup_steps: int = Field(default=0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)  # cosine floor as a fraction of lr
    log_every: int = Field(default=10, gt=0)
    checkpoint_every: int = Field(default=0, ge=0)  # 0 = only at the end when a directory is given
    keep_checkpoints: int = Field(default=2, ge=1)
    progress: bool = True
    # FedProx's proximal term mu * ||w - w0||^2 / 2, w0 the trained weights at the call's start (in
    # a federated round: the global model the site received). Its gradient mu * (w - w0) is added
    # after clipping (and after DP's clip and noise: it reads no data, so the privacy accounting is
    # unchanged). 0: the step is exactly the plain one.
    proximal_mu: float = Field(default=0.0, ge=0)


@dataclass
class TrainResult:
    history: list[dict[str, float]]  # one record per step: step, each loss, lr, grad_norm, rate_min/max
    group_state: dict[str, torch.Tensor]  # the trained groups' state_dict entries only (CPU copies)
    groups: list[str]
    state: TrainState  # pass back as `state=` (and state.step as start_step) to continue
    examples: int  # samples processed
    examples_per_group: dict[str, int] = field(default_factory=dict)  # samples carrying each group's modality
    seconds: float = 0.0


class LocalStep(Protocol):
    """A replacement for the loop's forward/backward/clip (e.g. DP-SGD, healthfm_core.privacy):
    `wrap_optimizer` wraps the AdamW the loop built; each step the loop zeroes the gradients,
    calls the step (which must leave gradients for the wrapped optimizer to use) and steps."""

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer: ...

    def __call__(
        self, model: torch.nn.Module, batch: Batch, weights: Any, generator: torch.Generator
    ) -> tuple[dict[str, float], float]:
        """-> (loss values by name, including "total"; a gradient norm to log)."""
        ...


# ---------------------------------------------------------------- helpers

NATIVE_BF16 = (8, 0)  # Ampere and newer: bf16 tensor cores


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. bf16 autocast is used on CUDA only: on CPU it is
    slower than fp32 and changes numerics for nothing. ``auto`` takes it on cards with native bf16
    (compute capability 8.0 and newer, read for ``device`` itself): torch's ``is_bf16_supported()``
    also says yes where bf16 is only emulated (a T4), and asks the current device, not this one."""
    if precision == "fp32":
        return None
    if device.type != "cuda":
        if precision == "bf16":
            log.warning("precision=bf16 requested on %s: training in fp32 (bf16 autocast is CUDA only)", device)
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < NATIVE_BF16:
        if precision == "auto":
            return None
        log.warning("precision=bf16 on %s (compute capability %d.%d): bf16 is emulated there, slower than fp32",
                    device, major, minor)  # fmt: skip
    return torch.bfloat16


def learning_rate(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def step_seed(seed: int, step: int) -> int:
    """A per-step seed (splitmix-style mixing, so nearby seeds and steps do not correlate)."""
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**63 - 1)


class _BatchStream:
    """Endless batches from a re-iterable (a DataLoader, a list), tracking (epoch, batch) so a
    resumed run continues at the same batch. Calls data.set_epoch(epoch) when the data has it,
    so per-epoch shuffling can be reproduced after a restart."""

    def __init__(self, data: Iterable[Batch], epoch: int, batch_in_epoch: int) -> None:
        self.data = data
        self.epoch = epoch
        self.batch_in_epoch = batch_in_epoch
        self._one_shot = iter(data) is data
        self._it: Iterator[Batch] | None = None
        if self._one_shot and (epoch or batch_in_epoch):
            log.info("data is a one-shot iterator: assuming it already starts at the resume position")
        self._start(skip=0 if self._one_shot else batch_in_epoch)

    def _start(self, skip: int) -> None:
        if not self._one_shot:
            set_epoch(self.data, self.epoch)
        self._it = iter(self.data)
        for i in range(skip):
            if next(self._it, None) is None:
                raise ValueError(f"cannot resume at batch {skip} of pass {self.epoch}: the data has only {i} batches")

    def next(self) -> Batch:
        assert self._it is not None
        batch = next(self._it, None)
        if batch is None:
            if self._one_shot:
                raise ValueError(f"the data iterator ran out after {self.batch_in_epoch} batches")
            if self.batch_in_epoch == 0:
                raise ValueError("the data yielded no batches")
            self.epoch += 1
            self.batch_in_epoch = 0
            self._start(skip=0)
            batch = next(self._it, None)
            if batch is None:
                raise ValueError(f"the data yielded no batches in pass {self.epoch}")
        self.batch_in_epoch += 1
        return batch


def set_epoch(data: Iterable[Batch], epoch: int) -> None:
    """Make pass `epoch` over the data reproducible in a fresh process: call set_epoch on the data
    (or its dataset, e.g. PretrainingDataset's random prediction times), and re-seed a
    DataLoader's shuffling generator from (its first seed, epoch) - by default a DataLoader's
    generator just advances, so a restarted run would replay the first pass's order."""
    if hasattr(data, "set_epoch"):
        data.set_epoch(epoch)
        return
    dataset = getattr(data, "dataset", None)
    if dataset is not None and hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    gen = getattr(data, "generator", None)
    if isinstance(data, DataLoader) and isinstance(gen, torch.Generator):
        # The first seed is remembered on the loader: re-seeding changes gen.initial_seed().
        base = getattr(data, "_healthfm_base_seed", None)
        if base is None:
            base = gen.initial_seed()
            data._healthfm_base_seed = base
        gen.manual_seed(step_seed(base, epoch))


def _build_optimizer(
    named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig, state: TrainState | None
) -> torch.optim.AdamW:
    # No weight decay on biases, norms and other vectors (decaying a LayerNorm gain is harmful).
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
        fused=fused_adamw([p for _, p in named]),
    )
    if state is not None and state.optimizer:
        _load_optimizer_by_name(opt, named, state)
    return opt


def fused_adamw(params: Sequence[torch.Tensor]) -> bool | None:
    """AdamW's fused kernels where every parameter is a floating-point CUDA tensor: one launch per
    chunk of tensors for the whole update, where the default (foreach) path launches each of its
    ~10 steps per chunk (for `paper`, hundreds of launches a step) and keeps its step counters on
    the host. Elsewhere torch's default (None): on CPU the per-parameter loop the step-equivalence
    tests pin."""
    if params and all(p.is_cuda and p.is_floating_point() for p in params):
        return True
    return None


def _load_optimizer_by_name(
    opt: torch.optim.AdamW, named: list[tuple[str, torch.nn.Parameter]], state: TrainState
) -> None:
    """Load saved AdamW moments by parameter name, so a run may train a different subset of
    groups than the state came from (parameters it does not cover start fresh). Hyperparameters
    (lr, weight decay) come from the current config, not from the saved state."""
    saved = state.optimizer or {}
    saved_state = saved.get("state", {})
    saved_order = [i for g in saved.get("param_groups", []) for i in g["params"]]
    if len(saved_order) != len(state.param_names):
        raise ValueError(
            f"optimizer state covers {len(saved_order)} parameters but param_names lists {len(state.param_names)}"
        )
    by_name = {name: saved_state.get(idx) for name, idx in zip(state.param_names, saved_order)}
    current = opt.state_dict()
    order = [i for g in current["param_groups"] for i in g["params"]]
    names_in_order = _names_in_optimizer_order(named)
    new_state = {}
    for idx, name in zip(order, names_in_order):
        s = by_name.get(name)
        if s is not None:
            param = dict(named)[name]
            exp_avg = s.get("exp_avg")
            if exp_avg is not None and exp_avg.shape != param.shape:
                raise ValueError(
                    f"optimizer state for {name}: shape {tuple(exp_avg.shape)} != parameter {tuple(param.shape)}"
                )
            new_state[idx] = s
    opt.load_state_dict({"state": new_state, "param_groups": current["param_groups"]})
    matched = len(new_state)
    if matched < len(names_in_order):
        log.info("optimizer state restored for %d of %d parameters", matched, len(names_in_order))


def _names_in_optimizer_order(named: list[tuple[str, torch.nn.Parameter]]) -> list[str]:
    return [n for n, p in named if p.ndim >= 2] + [n for n, p in named if p.ndim < 2]


# ---------------------------------------------------------------- the loop


@torch.no_grad()
def _add_proximal_gradient(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], mu: float) -> None:
    """p.grad += mu * (p - p0): the gradient of FedProx's mu * ||w - w0||^2 / 2."""
    for p, p0 in zip(params, anchor):
        pull = (p.detach() - p0) * mu
        if p.grad is None:
            p.grad = pull
        else:
            p.grad.add_(pull)


def train_local(
    model: torch.nn.Module,
    data: Iterable[Batch],
    cfg: TrainConfig,
    groups: Sequence[str] | None = None,
    weights_fn: Callable[[int], Any] | Any | None = None,
    start_step: int = 0,
    state: TrainState | None = None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
    group_of: Callable[[str], str] | None = None,
    stop_step: int | None = None,
    local_step: LocalStep | None = None,
    trainable: Callable[[str], bool] | None = None,
) -> TrainResult:
    """Train the parameters of `groups` (None = every group) for steps start_step .. stop_step-1
    (stop_step defaults to cfg.steps; stopping early leaves the schedule laid over cfg.steps, so a
    run split in pieces equals the whole).

    data: batches (a DataLoader or any re-iterable; reused for further passes when it runs out).
    weights_fn: objective weights, fixed (an ObjectiveWeights) or per step (step -> weights);
      None = the model's default ObjectiveWeights().
    state: a previous TrainResult.state / Checkpoint.state, to resume (optimizer moments, data
      position and RNG). Parameters outside `groups` are frozen for the call (requires_grad
      restored afterwards) and never change.
    checkpoint_dir: when given, a checkpoint is written every cfg.checkpoint_every steps and at
      the end, as checkpoint_dir/step-NNNNNNNN.
    group_of: state_dict key -> group (default healthfm_core.model.groups.parameter_group).
    local_step: replaces forward/backward/clipping (cfg.grad_clip is then not applied), e.g.
      healthfm_core.privacy.engine.DPLocalStep for DP-SGD.
    trainable: parameter name -> whether it trains (None: every parameter of `groups`); the others
      of `groups` stay as they are (frozen for the call) and are still returned in group_state.
      Under DP only the trained parameters are clipped and noised.
    """
    stop_step = cfg.steps if stop_step is None else stop_step
    if not 0 <= start_step <= stop_step <= cfg.steps:
        raise ValueError(f"need 0 <= start_step ({start_step}) <= stop_step ({stop_step}) <= steps ({cfg.steps})")
    group_of = group_of or parameter_group
    device = next(model.parameters()).device
    autocast_dtype = resolve_precision(cfg.precision, device)

    all_named = list(model.named_parameters())
    chosen, named = _trained_parameters(all_named, groups, group_of, trainable)
    saved_requires_grad = {n: p.requires_grad for n, p in all_named}
    was_training = model.training
    trained = {n for n, _ in named}
    for n, p in all_named:
        p.requires_grad_(n in trained)
    state = _start_state(cfg, state, start_step)

    try:
        opt: torch.optim.Optimizer = _build_optimizer(named, cfg, state)
        if local_step is not None:
            opt = local_step.wrap_optimizer(opt)
        stream = _BatchStream(data, state.epoch, state.batch_in_epoch)
        # A CPU generator: HealthFM draws its masks and modality dropout on the CPU and moves them.
        generator = torch.Generator()
        params = [p for _, p in named]
        anchor = [p.detach().clone() for p in params] if cfg.proximal_mu > 0 else None
        history: list[dict[str, float]] = []
        examples = 0
        per_group = {g: 0 for g in chosen}
        t0 = time.perf_counter()
        model.train()
        bar = tqdm(range(start_step, stop_step), desc="train", disable=not cfg.progress, leave=False)
        for step in bar:
            host_batch = stream.next()
            batch = host_batch.to(device)
            weights = _weights_at(weights_fn, step)
            lr = learning_rate(cfg, step)
            for param_group in opt.param_groups:
                param_group["lr"] = lr
            generator.manual_seed(step_seed(cfg.seed, step))
            if local_step is not None:  # a step the LocalStep takes whole (forward, backward, clipping)
                opt.zero_grad(set_to_none=True)
                with step_autocast(device, autocast_dtype):
                    names, values, grad_norm = _replaced_step(local_step, model, batch, weights, generator, step)
            else:  # the default step: one loss over the batch, backward, clipping
                names, values, losses = forward_losses(model, batch, weights, generator, step, device, autocast_dtype)
                opt.zero_grad(set_to_none=True)
                losses["total"].backward()
                grad_norm = _clip(params, cfg.grad_clip)
            if anchor is not None:
                _add_proximal_gradient(params, anchor, cfg.proximal_mu)
            opt.step()

            record = _step_record(model, step, names, values, lr, grad_norm)
            history.append(record)
            examples += batch.batch_size
            # Counted on the batch as the data gave it (the host, where a loader gives CPU tensors),
            # in one read.
            present = host_batch.has_modality()
            counts = dict(zip(present, torch.stack(list(present.values())).sum(dim=1).tolist()))
            for g in chosen:
                per_group[g] += counts.get(g, batch.batch_size)
            if cfg.progress:
                bar.set_postfix(loss=f"{values[names.index('total')]:.4f}")
            if (step + 1) % cfg.log_every == 0 or step == start_step or step + 1 == stop_step:
                log.info("step %d/%d %s", step + 1, cfg.steps, _fmt(record))

            done = step + 1
            if (
                checkpoint_dir is not None
                and cfg.checkpoint_every
                and done % cfg.checkpoint_every == 0
                and done < stop_step
            ):
                _checkpoint(model, opt, named, stream, done, cfg, checkpoint_dir, checkpoint_extra)

        done = stop_step
        final_state = _snapshot(opt, named, stream, done)
        if checkpoint_dir is not None:
            save_checkpoint(
                Path(checkpoint_dir) / checkpoint_name(done),
                model,
                final_state,
                config=cfg.model_dump(mode="json"),
                extra=checkpoint_extra,
            )
            prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints)
        group_state = {k: v.detach().to("cpu", copy=True) for k, v in _group_state(model, chosen, group_of).items()}
        return TrainResult(
            history=history,
            group_state=group_state,
            groups=chosen,
            state=final_state,
            examples=examples,
            examples_per_group=per_group,
            seconds=time.perf_counter() - t0,
        )
    finally:
        for n, p in all_named:
            p.requires_grad_(saved_requires_grad[n])
        model.train(was_training)


def _trained_parameters(
    all_named: list[tuple[str, torch.nn.Parameter]],
    groups: Sequence[str] | None,
    group_of: Callable[[str], str],
    trainable: Callable[[str], bool] | None = None,
) -> tuple[list[str], list[tuple[str, torch.nn.Parameter]]]:
    """The groups a call trains (None: every group of the model) and their trainable parameters
    (those `trainable` accepts, where given)."""
    known = sorted({group_of(n) for n, _ in all_named})
    chosen = list(known) if groups is None else list(dict.fromkeys(groups))
    group_names = _valid_group_names(group_of, known)
    if unknown := [g for g in chosen if g not in group_names]:
        raise ValueError(f"unknown parameter group(s) {unknown}; groups are {sorted(group_names)}")
    named = [
        (n, p)
        for n, p in all_named
        if group_of(n) in chosen and p.requires_grad and (trainable is None or trainable(n))
    ]
    if not named:
        what = "" if trainable is None else " that the call's `trainable` accepts"
        raise ValueError(f"no trainable parameters{what} in groups {chosen} (model groups: {known})")
    return chosen, named


def _start_state(cfg: TrainConfig, state: TrainState | None, start_step: int) -> TrainState:
    """A fresh run seeds torch's RNG from cfg.seed; a resumed one restores the saved RNG states."""
    if state is None:
        torch.manual_seed(cfg.seed)
        return TrainState(step=start_step)
    if state.rng_cpu is not None:
        torch.set_rng_state(state.rng_cpu)
    if state.rng_cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state.rng_cuda)
    return state


def _replaced_step(
    local_step: LocalStep, model: torch.nn.Module, batch: Batch, weights: Any, generator: torch.Generator, step: int
) -> tuple[list[str], list[float], float]:
    """A step the caller's LocalStep takes whole (e.g. DP-SGD): its losses' names and values and
    its gradient norm."""
    step_losses, grad_norm = local_step(model, batch, weights, generator)
    names = sorted(step_losses)
    values = [float(step_losses[k]) for k in names]
    if "total" not in step_losses or not math.isfinite(step_losses["total"]):
        raise FloatingPointError(f"step {step}: local step returned losses {step_losses}")
    return names, values, grad_norm


def step_autocast(device: torch.device, autocast_dtype: torch.dtype | None) -> torch.autocast:
    """The step's autocast on ``device``: to ``autocast_dtype``, off where it is None (fp32)."""
    return torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None)


def forward_losses(
    model: torch.nn.Module,
    batch: Batch,
    weights: Any,
    generator: torch.Generator,
    step: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    cast_weights: bool = True,
) -> tuple[list[str], list[float], dict[str, torch.Tensor]]:
    """The default step's forward in the step's precision (``step_autocast``), the linears'
    weights cast once for the step (``linear_weights_cast_once``; ``cast_weights`` False: each
    linear casts its own, as autocast alone does); the losses as ``_losses`` gives them."""
    with (
        step_autocast(device, autocast_dtype),
        linear_weights_cast_once(model, autocast_dtype if cast_weights else None),
    ):
        return _losses(model, batch, weights, generator, step)


def _losses(
    model: torch.nn.Module, batch: Batch, weights: Any, generator: torch.Generator, step: int
) -> tuple[list[str], list[float], dict[str, torch.Tensor]]:
    """The model's pretraining losses (names, values, and the tensors to backpropagate); a
    non-finite total is refused."""
    if not isinstance(model, Pretrainable):
        raise TypeError(f"train_local: model {type(model).__name__} has no pretraining_losses method")
    losses = model.pretraining_losses(batch, weights, generator=generator)
    if "total" not in losses:
        raise KeyError(f"pretraining_losses returned {sorted(losses)} without 'total'")
    names = sorted(losses)
    values = torch.stack([losses[k].detach().float() for k in names]).tolist()  # one host read
    if not math.isfinite(values[names.index("total")]):
        bad = [k for k, v in zip(names, values) if not math.isfinite(v)]
        raise FloatingPointError(f"step {step}: non-finite loss {bad} (values {dict(zip(names, values))})")
    return names, values, losses


def _clip(params: Sequence[torch.Tensor], grad_clip: float | None) -> float:
    """Clip the gradients' joint norm to grad_clip (None: no clipping); the norm before clipping."""
    if grad_clip is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    if not any(p.grad is not None for p in params):
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params if p.grad is not None])))


def _step_record(
    model: torch.nn.Module, step: int, names: list[str], values: list[float], lr: float, grad_norm: float
) -> dict[str, float]:
    """One step's history entry: its losses, lr, gradient norm and the decay rates' range."""
    record = {"step": float(step), **dict(zip(names, values)), "lr": lr, "grad_norm": grad_norm}
    rates = decay_rate_range(model)  # None for a model without DecayKernels
    if rates is not None:
        record["rate_min"], record["rate_max"] = rates
    return record


def _valid_group_names(group_of: Callable[[str], str], known: list[str]) -> set[str]:
    if group_of is parameter_group:
        return set(GROUPS)
    return set(known)


def _group_state(model: torch.nn.Module, groups: list[str], group_of: Callable[[str], str]) -> dict[str, torch.Tensor]:
    if group_of is parameter_group:
        return group_state_dict(model.state_dict(), groups)
    return {k: v for k, v in model.state_dict().items() if group_of(k) in groups}


def _weights_at(weights_fn: Callable[[int], Any] | Any | None, step: int) -> Any:
    if weights_fn is None:
        return ObjectiveWeights()
    if callable(weights_fn) and not isinstance(weights_fn, BaseModel):
        return weights_fn(step)
    return weights_fn


def _snapshot(
    opt: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]], stream: _BatchStream, step: int
) -> TrainState:
    return TrainState(
        step=step,
        param_names=_names_in_optimizer_order(named),
        optimizer=opt.state_dict(),
        epoch=stream.epoch,
        batch_in_epoch=stream.batch_in_epoch,
        rng_cpu=torch.get_rng_state(),
        rng_cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )


def _checkpoint(model, opt, named, stream, step, cfg, checkpoint_dir, extra) -> None:
    save_checkpoint(
        Path(checkpoint_dir) / checkpoint_name(step),
        model,
        _snapshot(opt, named, stream, step),
        config=cfg.model_dump(mode="json"),
        extra=extra,
    )
    prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints)


def _fmt(record: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step")


class Trainer:
    """A model, its data and a config bound together; `fit()` runs train_local and keeps the
    state so a second `fit(steps=...)` continues where the first stopped."""

    def __init__(
        self,
        model: torch.nn.Module,
        data: Iterable[Batch],
        cfg: TrainConfig,
        groups: Sequence[str] | None = None,
        weights_fn: Callable[[int], Any] | Any | None = None,
        checkpoint_dir: str | Path | None = None,
        group_of: Callable[[str], str] | None = None,
    ) -> None:
        self.model, self.data, self.cfg = model, data, cfg
        self.groups, self.weights_fn, self.checkpoint_dir, self.group_of = groups, weights_fn, checkpoint_dir, group_of
        self.state: TrainState | None = None
        self.history: list[dict[str, float]] = []

    def resume_from(self, path: str | Path) -> int:
        """Load a checkpoint's weights into the model and its state; returns the step reached."""
        ckpt = load_checkpoint(path, self.model)
        self.state = ckpt.state
        return ckpt.step

    def fit(self, until: int | None = None) -> TrainResult:
        """Train up to step `until` (default cfg.steps)."""
        result = train_local(
            self.model,
            self.data,
            self.cfg,
            groups=self.groups,
            weights_fn=self.weights_fn,
            start_step=self.state.step if self.state else 0,
            state=self.state,
            checkpoint_dir=self.checkpoint_dir,
            group_of=self.group_of,
            stop_step=until,
        )
        self.state = result.state
        self.history.extend(result.history)
        return result
