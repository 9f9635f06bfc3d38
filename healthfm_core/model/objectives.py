"""Pretraining objectives, their weights, the curriculum and the loss balancing.

Losses (each returned by name; 0 when the batch holds no data for it, never NaN):
  ehr_masked_code   masked EHR code slots -> the set of codes hidden in each token, from the
                    token's state (balanced multi-label BCE over the vocabulary; codes still
                    visible in the token are left out: they are known, not negatives)
  ehr_masked_value  masked code slots with a value -> the value, given the token state and the
                    code (MSE)
  wear_masked       masked wearable patches -> every epoch's channels (MSE over observed ones)
  prs_masked        masked PRS traits -> their scores from the other traits (MSE)
  next_visit        the set of codes of a later visit (the tokens of one day window) from the
                    state just before it (multi-label BCE); codes already in the history form a
                    separate "repeat" term weighted by `next_visit_repeat_weight`, so copying the
                    history cannot dominate the loss
  future_codes      query tokens, each placed at a random anchor event time (time-causal: one sees only
                    tokens at or before its anchor; `future_anchors_per_sample` of them share one
                    forward pass, as no token reads a query), predict the set of codes in (anchor, anchor + h]
                    for each h of `future_horizons_days` (one head each); new onsets and repeats are
                    separate terms as in next_visit; a window the record does not cover contributes
                    only its observed positives (censoring). This trains the state `embed` returns.
  predictive        asymmetric predictive coding: the state at a wearable patch predicts which EHR
                    codes occur in (patch end, patch end + horizon] (multi-label BCE)
  align             InfoNCE between the wearable summary and the EHR summary (events within
                    `align_window_days` of the wear period) of the same sample
Intra-modal: the first six. Cross-modal: predictive, align.
A model built without a modality has none of its heads: its losses are skipped (returned as 0),
like those of a batch without that modality.

Balancing (PretrainingConfig.loss_balance):
  "log":  total = sum_i w_i * log(eps + L_i). Its gradient is w_i * grad(L_i) / (eps + L_i): every
          loss is scaled by its own current magnitude, so a cross-entropy over thousands of codes
          (~log V) cannot swamp an MSE on normalised wearables (~1). This is uncertainty
          weighting (Kendall et al. 2018) with each sigma_i^2 at its closed-form optimum L_i, with
          no extra parameters or state (so federated averaging and checkpoint resume are unaffected).
  "none": total = sum_i w_i * L_i.
The multi-label losses average positives and negatives separately (balanced BCE), so a vocabulary
of mostly-absent codes does not reduce them to "predict nothing".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from healthfm_core.data.sequences.batch import N_SPECIAL_CODES, Batch
from healthfm_core.device_copy import device_values
from healthfm_core.model.outputs import ModelOutput, ReconstructionMasks
from healthfm_core.terms.model_config import ModelConfig, PretrainingConfig
from healthfm_core.terms.objective_weights import LOSS_NAMES, ObjectiveWeights


class PretrainingModel(Protocol):
    """What the objectives use of a model (HealthFM, whose pretraining_losses calls them)."""

    cfg: ModelConfig
    vocab_size: int
    heads: nn.ModuleDict

    def __call__(
        self,
        batch: Batch,
        masks: ReconstructionMasks | None = None,
        generator: torch.Generator | None = None,
        query_time: Tensor | None = None,
    ) -> ModelOutput: ...


# ----------------------------------------------------------------------------- masks


def _rand(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator).to(device)


def _at_least_one(mask: Tensor, valid: Tensor, draw: Tensor) -> Tensor:
    """Add one random valid position to every row that has valid positions but none in `mask`."""
    if mask.shape[1] == 0:
        return mask
    rows = valid.any(dim=1) & ~mask.any(dim=1)
    pick = torch.where(valid, draw, -1.0).argmax(dim=1)
    return mask | (_one_hot(pick, mask.shape[1]) & rows[:, None])


def _one_hot(index: Tensor, n: int) -> Tensor:
    """[..] -> [.., n] bool; F.one_hot checks its input's range on the host (a sync a call)."""
    return torch.arange(n, device=index.device) == index[..., None]


def sample_masks(batch: Batch, cfg: PretrainingConfig, generator: torch.Generator | None = None) -> ReconstructionMasks:
    """Masked-reconstruction positions: each valid item with its modality's probability, at least
    one per sample that has the modality; PRS keeps at least one trait visible (else no mask).
    EHR items are code slots [B, N, K] of visible tokens (a token may lose some or all codes)."""
    device = batch.codes.device
    pt = batch.prediction_time[:, None]
    slots = batch.code_valid & (batch.times <= pt)[..., None]
    flat = slots.flatten(1)
    draw = _rand(flat.shape, generator, device)
    ehr = _at_least_one((draw < cfg.ehr_mask_prob) & flat, flat, draw).view_as(slots)

    wear_valid = batch.wear_valid & (batch.wear_times <= pt)
    draw = _rand(wear_valid.shape, generator, device)
    wear = _at_least_one((draw < cfg.wear_mask_prob) & wear_valid, wear_valid, draw)

    prs_valid = batch.prs_valid
    draw = _rand(prs_valid.shape, generator, device)
    if prs_valid.shape[1] == 0:  # no PRS trait in the vocabulary (no site has genomics)
        return ReconstructionMasks(ehr=ehr, wear=wear, prs=prs_valid.clone())
    maskable = prs_valid & (prs_valid.sum(dim=1, keepdim=True) >= 2)
    prs = _at_least_one((draw < cfg.prs_mask_prob) & maskable, maskable, draw)
    # Keep the highest-draw valid trait visible where everything got masked.
    all_hidden = maskable.any(dim=1) & ~(maskable & ~prs).any(dim=1)
    keep = _one_hot(torch.where(maskable, draw, -1.0).argmax(dim=1), prs.shape[1])
    prs = prs & ~(keep & all_hidden[:, None])
    return ReconstructionMasks(ehr=ehr, wear=wear, prs=prs)


# ----------------------------------------------------------------------------- loss pieces


def _masked_mean(x: Tensor, mask: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
    """Mean of x where mask, over `dims` (None: all), 0 where the mask is empty."""
    if dims is None:
        return (x * mask.to(x.dtype)).sum() / mask.sum().clamp_min(1)
    return (x * mask.to(x.dtype)).sum(dims) / mask.sum(dims).clamp_min(1)


def _mean_of_present(terms: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """(mean over dim 0 of the terms [T, ..] whose `present` [T, ..] is True, whether any is):
    decided on the device, where a Python list of the present terms would read each flag on
    the host."""
    weight = present.to(terms.dtype)
    return (terms * weight).sum(0) / weight.sum(0).clamp_min(1), present.any(0)


def balanced_bce_terms(
    logits: Tensor, targets: Tensor, include: Tensor, per_group: bool = False
) -> tuple[Tensor, Tensor]:
    """(mean BCE over included positives plus mean over included negatives, halved, or the one
    that has entries; whether any entry is included) without a host sync. `per_group`: one
    such pair per index of the first dimension ([G] each) instead of one over everything.

    `include` may carry leading dimensions that `logits` lacks ([S, ..] against [..]): then one
    pair per leading index ([S] or [S, G]), all from one BCE over the logits (on a GPU each op is
    a launch: onset_repeat_terms' two terms cost ~17 this way, ~34 a term at a time)."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    positive = targets > 0.5
    lead = include.dim() - bce.dim()
    # [2, S.., ..]: the included positives and the included negatives as weights, both sides
    # reduced at once (a side at a time took ~27 launches a call, this ~17).
    sides = (torch.stack([positive, ~positive]).view(2, *(1,) * lead, *bce.shape) & include).to(bce.dtype)
    dims = tuple(range(1 + lead + per_group, sides.dim()))
    counts = sides.sum(dims)
    means = (bce * sides).sum(dims) / counts.clamp_min(1)
    has = counts > 0
    # An empty side's mean is 0, so the sum over the sides is the sum over those present.
    return means.sum(0) / has.sum(0).clamp_min(1), has.any(0)


def balanced_bce(logits: Tensor, targets: Tensor, include: Tensor) -> Tensor | None:
    """balanced_bce_terms' loss; None if nothing included."""
    loss, present = balanced_bce_terms(logits, targets, include)
    return loss if bool(present) else None


def _present(name: str, loss: Tensor, present: Tensor) -> dict[str, Tensor]:
    """{name: loss} when `present` (one host read per objective), else {} (the loss is left out
    of the total, so its head gets no gradient)."""
    return {name: loss} if bool(present) else {}


def _multi_hot(codes: Tensor, include: Tensor, vocab_size: int) -> Tensor:
    """codes [B, N, K] and include [B, R, N] (tokens of each of R rows) -> [B, R, V] float: 1 at
    every code of an included token (PAD too: the losses read only real codes)."""
    b, r, n = include.shape
    k = codes.shape[2]
    weight = include[..., None].expand(b, r, n, k).reshape(b, r, n * k).to(torch.float32)
    index = codes.reshape(b, 1, n * k).expand(b, r, n * k)
    return torch.zeros(b, r, vocab_size, device=codes.device).scatter_add_(2, index, weight).clamp_max(1.0)


def _random_subset(candidates: Tensor, cap: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Up to `cap` positions of each row of candidates [B, N], uniformly at random without
    replacement: (positions [B, c], chosen [B, c] bool), c = min(cap, N). The top-c of uniform
    keys drawn for every position, so the draw has one shape whatever the data."""
    keys = _rand(candidates.shape, generator, candidates.device)
    top = torch.where(candidates, keys, -1.0).topk(min(cap, candidates.shape[1]), dim=1)
    return top.indices, top.values >= 0


def ehr_reconstruction_losses(
    model: PretrainingModel, out: ModelOutput, batch: Batch, masks: ReconstructionMasks
) -> dict[str, Tensor]:
    """Per token with hidden code slots: its state -> the set of hidden codes (balanced BCE over
    real codes, the token's visible codes excluded) and, per hidden code with a value, the value.
    The tokens and slots are gathered by index (one nonzero each, read once)."""
    if out.n_ehr == 0 or masks.ehr is None:
        return {}
    code_valid = batch.code_valid[:, : out.n_ehr]
    hidden = masks.ehr[:, : out.n_ehr] & code_valid & out.ehr_valid[..., None]
    tokens = hidden.any(dim=-1).nonzero(as_tuple=True)
    if tokens[0].numel() == 0:
        return {}
    states = out.ehr_states[tokens]  # [t, d]
    vocab = model.vocab_size
    token_codes, token_hidden = batch.codes[:, : out.n_ehr][tokens], hidden[tokens]  # [t, K]
    shown = code_valid[tokens] & ~token_hidden
    targets = torch.zeros(len(states), vocab, device=states.device).scatter_add_(1, token_codes, token_hidden.float())
    targets = targets.clamp_max(1.0)
    visible = torch.zeros(len(states), vocab, device=states.device).scatter_add_(1, token_codes, shown.float()) > 0
    real = (torch.arange(vocab, device=states.device) >= N_SPECIAL_CODES)[None, :]
    losses = _present("ehr_masked_code", *balanced_bce_terms(model.heads["ehr_code"](states), targets, real & ~visible))
    row, slot = (token_hidden & batch.has_value[:, : out.n_ehr][tokens]).nonzero(as_tuple=True)
    if row.numel():
        predicted = model.heads["ehr_value"](states[row], token_codes[row, slot]).float()
        target = batch.values[:, : out.n_ehr][tokens][row, slot].float()
        losses["ehr_masked_value"] = F.mse_loss(predicted, target)
    return losses


def wearable_reconstruction_loss(
    model: PretrainingModel, out: ModelOutput, batch: Batch, masks: ReconstructionMasks
) -> dict[str, Tensor]:
    if out.n_wear == 0 or masks.wear is None or "wear_recon" not in model.heads:
        return {}
    hidden = (masks.wear[:, : out.n_wear] & out.wear_valid).nonzero(as_tuple=True)
    if hidden[0].numel() == 0:
        return {}
    n_epochs = batch.wear_epochs.shape[2]
    predicted = model.heads["wear_recon"](out.wear_states[hidden], n_epochs).float()
    target = batch.wear_epochs[:, : out.n_wear][hidden].float()
    observed = out.epoch_valid[hidden]
    return {"wear_masked": _masked_mean((predicted - target) ** 2, observed)}


def prs_reconstruction_loss(
    model: PretrainingModel, out: ModelOutput, batch: Batch, masks: ReconstructionMasks
) -> dict[str, Tensor]:
    if out.genomics_cond is None or masks.prs is None or "prs_recon" not in model.heads:
        return {}
    hidden = masks.prs & batch.prs_valid & out.present["genomics"][:, None]
    if model.cfg.pretraining.prs_reconstruct_shown:
        hidden = batch.prs_valid & out.present["genomics"][:, None]  # every trait: hidden and shown
    predicted = model.heads["prs_recon"](out.genomics_cond).float()
    return _present("prs_masked", _masked_mean((predicted - batch.prs.float()) ** 2, hidden), hidden.any())


def onset_repeat_terms(
    logits: Tensor,
    targets: Tensor,
    seen: Tensor,
    repeat_weight: float,
    include: Tensor | None = None,
    per_group: bool = False,
    separate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Balanced BCE over real codes with new onsets (codes not `seen` in the history) and repeats as
    separate terms, the repeat term scaled by `repeat_weight` (the guard that keeps copying the
    history from dominating). `include` [A, V] further restricts the entries (None: all).
    -> (the sum of the terms that have entries, whether any has), without a host sync; per index
    of the first dimension with `per_group` (see balanced_bce_terms). `separate` False: one
    balanced term over every code, seen or not (PretrainingConfig.separate_repeats)."""
    real = (torch.arange(logits.shape[-1], device=logits.device) >= N_SPECIAL_CODES)[None, :]
    allowed = real if include is None else real & include
    if not separate:
        return balanced_bce_terms(logits, targets, allowed.expand_as(targets), per_group)
    # [2, ..]: the new onsets and the repeats, both terms from one BCE over the logits.
    terms, present = balanced_bce_terms(logits, targets, torch.stack([~seen, seen]) & allowed, per_group)
    new_onset, repeat = (terms * present.to(terms.dtype)).unbind(0)  # unbind's backward: one stack
    return new_onset + repeat_weight * repeat, present.any(0)


def onset_repeat_bce(
    logits: Tensor, targets: Tensor, seen: Tensor, repeat_weight: float, include: Tensor | None = None
) -> Tensor | None:
    """onset_repeat_terms' loss; None when neither term has entries."""
    loss, present = onset_repeat_terms(logits, targets, seen, repeat_weight, include)
    return loss if bool(present) else None


def next_visit_loss(
    model: PretrainingModel, out: ModelOutput, batch: Batch, cfg: PretrainingConfig, generator: torch.Generator | None
) -> dict[str, Tensor]:
    """For up to max_visits_per_sample visits after a sample's first, the latest token strictly
    before the visit predicts the visit's codes; new-onset and repeat codes are separate terms.

    A visit is the events of one day window (floor of the time). Every sample's visits are laid
    out at once ([B, visits] with a mask), so no shape depends on the data."""
    if out.n_ehr == 0:
        return {}
    valid = out.ehr_valid
    times = batch.times[:, : out.n_ehr]
    codes = batch.codes[:, : out.n_ehr]  # [B, N, K] (PAD slots fall outside the real codes)
    days = torch.floor(times).masked_fill(~valid, float("inf"))
    # A visit's first token in day order stands for it; the first visit of a sample has no context.
    ordered, order = days.sort(dim=1, stable=True)
    opens = torch.ones_like(valid)
    opens[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    opens[:, 0] = False
    later = torch.zeros_like(valid).scatter(1, order, opens & torch.isfinite(ordered))
    position, chosen = _random_subset(later, cfg.max_visits_per_sample, generator)  # [B, R]
    day = days.gather(1, position)
    in_visit = valid[:, None, :] & (days[:, None, :] == day[..., None])  # [B, R, N]
    start = times[:, None, :].masked_fill(~in_visit, float("inf")).amin(dim=2)  # [B, R]
    key_times = out.times.masked_fill(~out.key_valid, float("inf"))[:, None, :]  # [B, 1, L]
    before = key_times < start[..., None]
    context = torch.where(before, key_times, -float("inf")).argmax(dim=2)  # the latest, first on ties
    rows = chosen & before.any(dim=2)
    history = valid[:, None, :] & (times[:, None, :] < start[..., None])
    logits = model.heads["ehr_next_visit"](out.states.gather(1, context[..., None].expand(-1, -1, out.states.shape[2])))
    targets = _multi_hot(codes, in_visit, model.vocab_size)
    seen = _multi_hot(codes, history, model.vocab_size) > 0
    loss = onset_repeat_terms(
        logits, targets, seen, cfg.next_visit_repeat_weight, rows[..., None], separate=cfg.separate_repeats
    )
    return _present("next_visit", *loss)


def _events_up_to_prediction(batch: Batch) -> Tensor:
    return batch.ehr_valid & (batch.times <= batch.prediction_time[:, None])


def sample_future_anchors(
    batch: Batch, cfg: PretrainingConfig, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Q = cfg.future_anchors_per_sample anchors per sample for future_codes: -> (anchor times
    [B, Q], has_anchor [B, Q] bool).

    Candidates are the sample's EHR event times t with an event later than t + the shortest
    horizon (so at least one window lies inside the record); each anchor is drawn uniformly from
    them (with replacement) from `generator`. Samples without a candidate keep their
    prediction_time and has_anchor False.
    """
    events = _events_up_to_prediction(batch)
    q = cfg.future_anchors_per_sample
    draw = _rand(
        (events.shape[0], q, events.shape[1]), generator, batch.times.device
    )  # drawn for every batch shape alike
    if events.shape[1] == 0:
        return (
            batch.prediction_time[:, None].expand(-1, q).clone(),
            torch.zeros(batch.batch_size, q, dtype=torch.bool, device=draw.device),
        )
    record_end = batch.times.masked_fill(~events, -float("inf")).max(dim=1).values
    candidates = events & (batch.times + min(cfg.future_horizons_days) < record_end[:, None])
    has_anchor = candidates.any(dim=1)[:, None].expand(-1, q)
    pick = torch.where(candidates[:, None, :], draw, -1.0).argmax(dim=2)  # [B, Q]
    chosen = batch.times.gather(1, pick)
    return torch.where(has_anchor, chosen, batch.prediction_time[:, None]), has_anchor.clone()


def future_window_targets(
    batch: Batch, anchor: Tensor, horizon_days: float, vocab_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """anchor [B] or [B, Q] -> (codes in (anchor, anchor + h] [..., V], codes at or before
    anchor [..., V] bool, window fully inside the record [...] bool). From the batch's events up
    to prediction_time, whatever modality dropout hid from the model."""
    single = anchor.dim() == 1
    at = anchor[:, None] if single else anchor  # [B, Q]
    targets, seen, covered = _future_windows(batch, at, (horizon_days,), vocab_size)
    targets, covered = targets[:, :, 0], covered[:, :, 0]
    if single:
        return targets[:, 0], seen[:, 0], covered[:, 0]
    return targets, seen, covered


def _future_windows(
    batch: Batch, at: Tensor, horizons_days: tuple[float, ...], vocab_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """future_window_targets for anchors at [B, Q] and H horizons at once: (targets [B, Q, H, V],
    seen [B, Q, V], covered [B, Q, H])."""
    b, n_query = at.shape
    horizons = device_values(horizons_days, at)  # [H]
    events = _events_up_to_prediction(batch)  # [B, N]
    n_slots = batch.codes.shape[1] * batch.codes.shape[2]
    slots = batch.code_valid[:, None, None]  # [B, 1, 1, N, K]
    times, start = batch.times[:, None, None, :], at[:, :, None, None]  # [B, 1, 1, N], [B, Q, 1, 1]
    end = start + horizons[None, None, :, None]  # [B, Q, H, 1]
    in_window = (events[:, None, None, :] & (times > start) & (times <= end))[..., None] & slots  # [B, Q, H, N, K]
    in_history = (events[:, None, None, :] & (times <= start))[..., None] & slots  # [B, Q, 1, N, K]
    codes = batch.codes.clamp_min(0).reshape(b, 1, n_slots)
    rows = n_query * len(horizons_days)
    targets = torch.zeros(b, rows, vocab_size, device=at.device)
    targets = targets.scatter_add_(2, codes.expand(-1, rows, -1), in_window.reshape(b, rows, n_slots).float())
    targets = targets.clamp_max(1.0).view(b, n_query, len(horizons_days), vocab_size)
    seen = torch.zeros(b, n_query, vocab_size, device=at.device)
    seen = seen.scatter_add_(2, codes.expand(-1, n_query, -1), in_history.reshape(b, n_query, n_slots).float()) > 0
    record_end = batch.times.masked_fill(~events, -float("inf")).max(dim=1).values
    covered = record_end[:, None, None] > at[..., None] + horizons  # [B, Q, H]
    return targets, seen, covered


def future_codes_loss(
    model: PretrainingModel, out: ModelOutput, batch: Batch, anchor: Tensor, has_anchor: Tensor, cfg: PretrainingConfig
) -> dict[str, Tensor]:
    """Each query state (`out.queries`, at `anchor` [B, Q]) -> codes in (anchor, anchor + h]
    per horizon.

    Censoring: where the record ends before anchor + h, absent codes are unknown, so only the
    codes observed in the window count (as positives); the mean over horizons with data is returned.
    """
    if anchor.dim() == 1:  # one query per sample
        anchor, has_anchor = anchor[:, None], has_anchor[:, None]
    if batch.codes.shape[1] == 0:
        return {}
    horizons = tuple(cfg.future_horizons_days)  # the head's first len(horizons) outputs, in order
    logits = model.heads["ehr_future_codes"](out.queries.flatten(0, 1)).unflatten(0, anchor.shape)[
        :, :, : len(horizons)
    ]
    targets, seen, covered = _future_windows(batch, anchor, horizons, model.vocab_size)  # [B, Q, H, V], ..
    include = (covered[..., None] | (targets > 0.5)) & has_anchor[:, :, None, None]

    def by_horizon(x: Tensor) -> Tensor:  # [B, Q, H, V] -> [H, B * Q, V]: a loss per horizon at once
        return x.permute(2, 0, 1, 3).flatten(1, 2)

    seen = seen[:, :, None].expand_as(targets)
    terms, present = onset_repeat_terms(
        by_horizon(logits),
        by_horizon(targets),
        by_horizon(seen),
        cfg.future_codes_repeat_weight,
        by_horizon(include),
        per_group=True,
        separate=cfg.separate_repeats,
    )
    return _present("future_codes", *_mean_of_present(terms, present))


def predictive_coding_loss(
    model: PretrainingModel,
    out: ModelOutput,
    batch: Batch,
    masks: ReconstructionMasks,
    cfg: PretrainingConfig,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    """State at a wearable patch -> codes in (patch time, patch time + horizon]. Targets come from
    the batch's EHR events (also when EHR was dropped from the model's input), and an anchor
    counts only if the record continues after it (else absence of codes is censoring)."""
    if out.n_wear == 0 or batch.codes.shape[1] == 0 or "wear_predictive" not in model.heads:
        return {}
    events = batch.ehr_valid & (batch.times <= batch.prediction_time[:, None])
    anchors_ok = out.wear_valid.clone()
    if masks.wear is not None:
        anchors_ok &= ~masks.wear[:, : out.n_wear]
    record_end = batch.times.masked_fill(~events, -float("inf")).amax(dim=1)
    patch_times = out.times[:, out.n_ehr : out.n_ehr + out.n_wear]
    patch, chosen = _random_subset(
        anchors_ok & (patch_times < record_end[:, None]), cfg.max_anchors_per_sample, generator
    )
    start = patch_times.gather(1, patch)[..., None]  # [B, R, 1]
    times = batch.times[:, None, :]
    in_window = events[:, None, :] & (times > start) & (times <= start + cfg.predictive_horizon_days)
    states = out.wear_states.gather(1, patch[..., None].expand(-1, -1, out.states.shape[2]))
    logits = model.heads["wear_predictive"](states)
    targets = _multi_hot(batch.codes, in_window, model.vocab_size)
    real = torch.arange(model.vocab_size, device=logits.device) >= N_SPECIAL_CODES
    return _present("predictive", *balanced_bce_terms(logits, targets, real & chosen[..., None]))


def alignment_loss(
    model: PretrainingModel, out: ModelOutput, batch: Batch, cfg: PretrainingConfig
) -> dict[str, Tensor]:
    """Symmetric InfoNCE between encoder-level wearable and EHR summaries (pre-backbone, so each
    summary holds one modality only). Other samples of the same subject are not negatives."""
    if out.wear_tokens is None or out.ehr_tokens is None or "wear_align" not in model.heads:
        return {}
    wear_w = out.wear_valid.to(out.wear_tokens.dtype)[..., None]
    wear_summary = (out.wear_tokens * wear_w).sum(1) / wear_w.sum(1).clamp_min(1)
    patch_times = out.times[:, out.n_ehr : out.n_ehr + out.n_wear]
    wear_start = patch_times.masked_fill(~out.wear_valid, float("inf")).min(dim=1).values
    wear_end = patch_times.masked_fill(~out.wear_valid, -float("inf")).max(dim=1).values
    ehr_times = batch.times[:, : out.n_ehr]
    near = (
        out.ehr_valid
        & (ehr_times >= (wear_start - cfg.align_window_days)[:, None])
        & (ehr_times <= (wear_end + cfg.align_window_days)[:, None])
    )
    ehr_w = near.to(out.ehr_tokens.dtype)[..., None]
    ehr_summary = (out.ehr_tokens * ehr_w).sum(1) / ehr_w.sum(1).clamp_min(1)
    (rows,) = (out.wear_valid.any(1) & near.any(1)).nonzero(as_tuple=True)
    if rows.numel() < 2:
        return {}
    z_wear = F.normalize(model.heads["wear_align"](wear_summary[rows]).float(), dim=-1)
    z_ehr = F.normalize(model.heads["wear_align_ehr"](ehr_summary[rows]).float(), dim=-1)
    logits = z_wear @ z_ehr.t() / cfg.align_temperature
    subjects = batch.subject_id[rows]
    eye = torch.eye(len(subjects), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill((subjects[:, None] == subjects[None, :]) & ~eye, -float("inf"))
    target = torch.arange(len(subjects), device=logits.device)
    return {"align": 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))}


# ----------------------------------------------------------------------------- all together


def combine_losses(losses: Mapping[str, Tensor], weights: ObjectiveWeights, cfg: PretrainingConfig) -> Tensor | None:
    """The balanced weighted total over the losses present with weight > 0 (None if there are none)."""
    w = weights.model_dump()
    names = [name for name in losses if w[name] > 0]
    if not names:
        return None
    # All losses at once: on a GPU each op is a launch, and a loss at a time took 3 forward and 3
    # backward a loss.
    stacked = torch.stack([losses[name] for name in names])
    scaled = torch.log(cfg.balance_eps + stacked) if cfg.loss_balance == "log" else stacked
    return (scaled * device_values([w[name] for name in names], scaled)).sum()


def pretraining_losses(
    model: PretrainingModel, batch: Batch, weights: ObjectiveWeights, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Every loss of LOSS_NAMES (0 where the batch has no data for it) plus "total".

    Modality dropout (in training mode) and the reconstruction masks draw from `generator`.
    """
    cfg = model.cfg.pretraining
    masks = sample_masks(batch, cfg, generator)
    anchor, has_anchor = sample_future_anchors(batch, cfg, generator)
    # The query token sits at the future_codes anchor (prediction_time where there is none); no
    # other objective reads the query state, so this costs no second forward pass.
    out = model(batch, masks=masks, generator=generator, query_time=anchor)
    losses: dict[str, Tensor] = {}
    losses.update(ehr_reconstruction_losses(model, out, batch, masks))
    losses.update(wearable_reconstruction_loss(model, out, batch, masks))
    losses.update(prs_reconstruction_loss(model, out, batch, masks))
    losses.update(next_visit_loss(model, out, batch, cfg, generator))
    losses.update(future_codes_loss(model, out, batch, anchor, has_anchor, cfg))
    losses.update(predictive_coding_loss(model, out, batch, masks, cfg, generator))
    losses.update(alignment_loss(model, out, batch, cfg))
    total = combine_losses(losses, weights, cfg)
    if total is None:
        # Nothing to learn from this batch: a zero that still backpropagates (into shared only).
        total = out.embedding.float().sum() * 0.0
    zero = torch.zeros((), device=out.states.device)
    result = {name: losses.get(name, zero) for name in LOSS_NAMES}
    result["total"] = total
    return result
