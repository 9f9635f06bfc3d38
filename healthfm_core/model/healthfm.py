"""HealthFM: modality encoders into one space, a continuous-time attention backbone, heads.

Read top to bottom:
  1. time features (the bounded decay kernel, DecayKernel, lives in attention.py),
  2. the backbone block (pre-norm, continuous-time attention, FiLM from genomics),
  3. the three encoders (EHR tokens pooling a time bucket's codes, wearable patches, PRS vector),
  4. the heads the pretraining objectives use,
  5. HealthFM: forward in named steps (what is visible, embed each modality, merge the tokens,
     backbone), embed, and pretraining_losses (computed in objectives.py). What forward takes
     and returns besides the batch lives in outputs.py.

Module names are part of the federation contract: every state_dict key starts with a prefix
that `healthfm_core.model.groups.parameter_group` maps to one group (ehr_encoder.,
wearable_encoder., genomics_encoder., backbone., heads.ehr_/wear_/prs_).

The model holds only the modalities it is built with (`HealthFM(..., modalities=...)`, the
federation's: see `model_modalities`): without wearables there is no wearable encoder and no
wear_ head, without genomics no genomics encoder and no prs_ head, so those groups are simply
absent from the state_dict. A batch may still carry a missing modality's tensors (collate pads
them), but only without a valid token: otherwise forward raises.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from healthfm_core.data.sequences.batch import EPOCH_DAYS, MASK_CODE, PAD_CODE, Batch
from healthfm_core.kernels.ct_attention import split_qkv
from healthfm_core.model.attention import DecayKernel, ct_attention, decay_mixtures, decay_rate_summary
from healthfm_core.model.dropout import Dropout
from healthfm_core.model.objectives import pretraining_losses
from healthfm_core.model.outputs import ModelOutput, ReconstructionMasks
from healthfm_core.terms.model_config import ModelConfig, embedding_width, model_modalities
from healthfm_core.terms.objective_weights import ObjectiveWeights
from healthfm_core.terms.site_layout import MODALITIES, WEARABLE_CHANNELS

N_CHANNELS = len(WEARABLE_CHANNELS)
# The "no decay" rate of the sinusoidal ablation: the contract wants lambda > 0; at 1e-9/day
# log K(dt) stays above -1e-5 for any dt under 27 years, i.e. attention is content-only.
_FLAT_RATE = 1e-9


# ----------------------------------------------------------------------------- time features


def sinusoidal_features(x: Tensor, periods: Tensor) -> Tensor:
    """[..] -> [.., 2F]: sin/cos of 2*pi*x/period. Computed in fp64: t*24 in days overflows fp32 precision."""
    angle = 2 * math.pi * x.double()[..., None] / periods.double()
    return torch.cat([angle.sin(), angle.cos()], dim=-1).to(torch.float32)


def _log_periods(n: int, lo: float, hi: float, device: torch.device | None = None) -> Tensor:
    return torch.logspace(math.log10(lo), math.log10(hi), n, device=device, dtype=torch.float64)


AGE_SCALE_DAYS = 3652.5  # ages enter the age embedding in decades


# ----------------------------------------------------------------------------- backbone


class CTSelfAttention(nn.Module):
    """Multi-head self-attention over token times with the continuous-time kernel (time-causal).

    `self.decay` is a module whose forward() gives (log_weights [H,M], rates [H,M]); None means
    the sinusoidal ablation, where the kernel is flat and time enters through token embeddings.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.decay: DecayKernel | None = None
        if cfg.time_encoding == "ct_kernel":
            # Mixture log-weights (log-softmax) and rates bounded in [min, max] per day, initialised
            # at log-spaced timescales (an hour to years): the guard against rate collapse.
            # DecayKernel's __init__ reads values on the host (.item()), which fails inside a
            # `with torch.device("meta")` block: build it on CPU, then follow the ambient device.
            ambient = torch.get_default_device()
            with torch.device("cpu"):
                decay = DecayKernel(
                    cfg.n_heads,
                    cfg.n_decay_components,
                    rate_min=cfg.min_rate_per_day,
                    rate_max=cfg.max_rate_per_day,
                    timescale_min_days=cfg.init_timescale_min_days,
                    timescale_max_days=cfg.init_timescale_max_days,
                )
            self.decay = decay.to(ambient)

    def kernel(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.decay is not None:
            return self.decay()
        flat_log_weights = torch.zeros(self.n_heads, 1, device=device)
        return flat_log_weights, torch.full((self.n_heads, 1), _FLAT_RATE, device=device)

    def forward(
        self, x: Tensor, times: Tensor, key_valid: Tensor, mixture: tuple[Tensor, Tensor] | None = None
    ) -> Tensor:
        """``mixture``: this layer's (log_weights, rates) when the caller computed them (the backbone
        does, for all its layers at once: ``decay_mixtures``); else ``self.kernel``."""
        b, n, d = x.shape
        q, k, v = split_qkv(self.qkv(x), self.n_heads)  # views; their gradients come back without a copy
        log_weights, rates = mixture if mixture is not None else self.kernel(x.device)
        out = ct_attention(q, k, v, times, times, log_weights, rates, key_valid=key_valid, causal=True)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def _mlp(d_in: int, ratio: float, dropout: float) -> nn.Sequential:
    hidden = int(round(d_in * ratio))
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), Dropout(dropout), nn.Linear(hidden, d_in))


def _modulate(h: Tensor, film: Tensor | None) -> Tensor:
    """Adaptive layer norm: h * (1 + scale) + shift, film = [B, 2d] (None = no genomics)."""
    if film is None:
        return h
    scale, shift = film.chunk(2, dim=-1)
    return h * (1 + scale[:, None, :]) + shift[:, None, :]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = CTSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = _mlp(cfg.d_model, cfg.mlp_ratio, cfg.dropout)
        self.drop = Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        times: Tensor,
        key_valid: Tensor,
        film: Tensor | None,
        mixture: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        film_attn, film_mlp = film.chunk(2, dim=-1) if film is not None else (None, None)
        x = x + self.drop(self.attn(_modulate(self.norm1(x), film_attn), times, key_valid, mixture))
        return x + self.drop(self.mlp(_modulate(self.norm2(x), film_mlp)))


class Backbone(nn.Module):
    """Shared temporal backbone: a query token, optional sinusoidal time embedding, blocks."""

    time_periods: Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.query_token = nn.Parameter(torch.randn(cfg.d_model) * 0.02)
        self.time_embedding: nn.Linear | None = None
        if cfg.time_encoding == "sinusoidal":
            n_freq = max(cfg.d_model // 4, 4)
            # Periods from an hour to ten years, the span the ct kernel's timescales cover.
            self.register_buffer("time_periods", _log_periods(n_freq, 1.0 / 24, 3652.5).float(), persistent=False)
            self.time_embedding = nn.Linear(2 * n_freq, cfg.d_model)
        # Age (time since MEDS_BIRTH) at each token: the one absolute time a risk depends on.
        # Calendar time stays out (the ct kernel sees only gaps), so shifting dates changes nothing.
        self.age_embedding = nn.Sequential(nn.Linear(1, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)

    def decay_mixtures(self) -> list[tuple[Tensor, Tensor] | None]:
        """Each layer's (log_weights, rates), computed for all layers in one go (``decay_mixtures``:
        the same numbers, a few ops instead of a few a layer); None for a layer without a decay
        kernel (the sinusoidal ablation: the layer makes its flat one)."""
        blocks = cast(list[Block], list(self.blocks))
        decays = [block.attn.decay for block in blocks]
        kernels = [d for d in decays if d is not None]
        if len(kernels) < len(decays):
            return [None] * len(decays)
        return list(decay_mixtures(kernels))

    def embed_time(self, x: Tensor, times: Tensor, birth_time: Tensor | None = None) -> Tensor:
        """Add the time inputs to tokens x [B, L, d] at times [B, L]: the age embedding where
        birth_time [B] is known (finite), and the sinusoidal encoding in that ablation."""
        if birth_time is not None:
            known = torch.isfinite(birth_time)
            age_decades = ((times - torch.where(known, birth_time, 0.0)[:, None]) / AGE_SCALE_DAYS)[..., None]
            x = x + self.age_embedding(age_decades.to(x.dtype)) * known[:, None, None].to(x.dtype)
        if self.time_embedding is None:
            return x
        return x + self.time_embedding(sinusoidal_features(times, self.time_periods))

    def forward(self, x: Tensor, times: Tensor, key_valid: Tensor, film: list[Tensor] | None) -> Tensor:
        mixtures = self.decay_mixtures()
        for i, block in enumerate(self.blocks):
            x = block(x, times, key_valid, film[i] if film is not None else None, mixtures[i])
        return _modulate(self.final_norm(x), film[-1] if film is not None else None)


# ----------------------------------------------------------------------------- encoders


# Width of the value MLP's hidden layer: it runs once per code (~10x the tokens on dense data),
# so it stays narrow; the value's meaning per code comes from the code's value gate.
VALUE_HIDDEN = 32


class EHREncoder(nn.Module):
    """One token per time bucket: each code slot becomes code embedding + has_value *
    value_mlp(value) * value_gate[code], and the token is their attention-pooled mean (softmax
    over the token's codes of a learned score) plus the EHR modality embedding.

    The value gate is per code, so a pooled panel still tells glucose=9 / sodium=130 from
    glucose=5 / sodium=140 (a shared value vector would add the values up anonymously). The
    pooling is a sum over the token's codes: the token does not depend on their order. Only the
    real code slots are computed (packed), so the cost follows the rows, not N x K.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.code_embedding = nn.Embedding(vocab_size, cfg.d_model, padding_idx=PAD_CODE)
        self.value_mlp = nn.Sequential(nn.Linear(1, VALUE_HIDDEN), nn.GELU(), nn.Linear(VALUE_HIDDEN, cfg.d_model))
        # A bare parameter (read with F.embedding) keeps its N(0, 1) init through HealthFM's
        # _init_weights: random per-code directions from the start.
        self.value_gate = nn.Parameter(torch.randn(vocab_size, cfg.d_model))
        self.pool_score = nn.Linear(cfg.d_model, 1)
        self.modality_embedding = nn.Parameter(torch.randn(cfg.d_model) * 0.02)

    def forward(self, codes: Tensor, values: Tensor, has_value: Tensor, slots: Tensor) -> Tensor:
        """codes / values / has_value / slots [B, N, K] (slots: the code slots to pool) -> [B, N, d].
        A token without any slot is the modality embedding alone."""
        b, n, k = codes.shape
        d = self.code_embedding.embedding_dim
        flat = slots.reshape(-1).nonzero().squeeze(1)
        token = torch.div(flat, k, rounding_mode="floor")
        code = codes.reshape(-1)[flat]
        x = self.code_embedding(code)
        value = values.reshape(-1)[flat].to(x.dtype)[:, None]
        with_value = has_value.reshape(-1)[flat].to(x.dtype)[:, None]
        x = x + self.value_mlp(value) * F.embedding(code, self.value_gate).to(x.dtype) * with_value
        score = self.pool_score(x).squeeze(-1)
        # Softmax within each token; the max only keeps exp() finite (a constant per token).
        top = score.new_full((b * n,), -float("inf")).scatter_reduce(0, token, score.detach(), "amax")
        weight = torch.exp(score - top[token])
        total = weight.new_zeros(b * n).index_add(0, token, weight)
        pooled = x.new_zeros(b * n, d).index_add(0, token, weight[:, None] * x)
        pooled = pooled / total.clamp_min(1e-30)[:, None]
        return pooled.view(b, n, d) + self.modality_embedding


class EpochBlock(nn.Module):
    """Pre-norm transformer block over the epochs of a patch (no time kernel: epochs are evenly spaced)."""

    def __init__(self, d: int, n_heads: int, ratio: float, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = _mlp(d, ratio, dropout)

    def forward(self, x: Tensor, epoch_present: Tensor) -> Tensor:
        n, e, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, e, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        # Every patch handed in has at least one present epoch, so no softmax row is empty. The boolean
        # mask costs nothing measurable on CPU: SDPA takes its flash path with it, and dropping it,
        # a float mask or splitting full from partial patches was no faster (benchmarks/epoch_attention.py).
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=epoch_present[:, None, None, :])
        x = x + self.proj(attn.transpose(1, 2).reshape(n, e, d))
        return x + self.mlp(self.norm2(x))


class WearableEncoder(nn.Module):
    """Epochs of one patch ([value*mask, mask] per channel + epoch position) -> one d_model token."""

    position_periods: Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w = cfg.wearable
        self.input_proj = nn.Linear(2 * N_CHANNELS, w.d_model)
        # Position of an epoch inside its patch: periods from 2 epochs to a day, fixed (no max length).
        self.register_buffer("position_periods", _log_periods(w.d_model // 2, 2.0, 2880.0).float(), persistent=False)
        self.blocks = nn.ModuleList(
            EpochBlock(w.d_model, w.n_heads, w.mlp_ratio, cfg.dropout) for _ in range(w.n_layers)
        )
        self.norm = nn.LayerNorm(w.d_model)
        self.out_proj = nn.Linear(w.d_model, cfg.d_model)
        self.modality_embedding = nn.Parameter(torch.randn(cfg.d_model) * 0.02)
        # Stands in for a patch hidden by masked reconstruction.
        self.mask_token = nn.Parameter(torch.randn(cfg.d_model) * 0.02)

    def forward(self, epochs: Tensor, epoch_mask: Tensor) -> Tensor:
        """epochs / epoch_mask [n, E, C] (every patch with >= 1 present epoch) -> [n, d_model]."""
        return self.out_proj(self.pool(epochs, epoch_mask)) + self.modality_embedding

    def pool(self, epochs: Tensor, epoch_mask: Tensor) -> Tensor:
        """The patch's pooled epoch states [n, wearable d_model], before the output projection:
        each patch's own (no cross-patch context), so an evaluation may reuse them
        (healthfm_core/eval/patch_reuse.py)."""
        n, e, _ = epochs.shape
        mask = epoch_mask.to(epochs.dtype)
        x = self.input_proj(torch.cat([epochs * mask, mask], dim=-1))
        positions = torch.arange(e, device=epochs.device, dtype=torch.float32)
        pe = sinusoidal_features(positions, self.position_periods)
        x = x + pe[None, :, : x.shape[-1]]
        present = epoch_mask.any(dim=-1)
        for block in self.blocks:
            x = block(x, present)
        weights = present.to(x.dtype)[..., None]
        return (self.norm(x) * weights).sum(dim=1) / weights.sum(dim=1)


class GenomicsEncoder(nn.Module):
    """PRS vector with missing traits masked -> static conditioning vector -> FiLM per block.

    Genomics is not a token: it modulates every layer norm of the backbone (adaptive layer norm),
    so its effect does not decay with time. The FiLM projections start at zero (identity).
    """

    def __init__(self, cfg: ModelConfig, n_prs_traits: int) -> None:
        super().__init__()
        g = cfg.genomics
        layers: list[nn.Module] = []
        d_in = 2 * n_prs_traits
        for _ in range(g.n_layers):
            layers += [nn.Linear(d_in, g.d_hidden), nn.GELU()]
            d_in = g.d_hidden
        self.mlp = nn.Sequential(*layers)
        self.film_blocks = nn.ModuleList(nn.Linear(g.d_hidden, 4 * cfg.d_model) for _ in range(cfg.n_layers))
        self.film_final = nn.Linear(g.d_hidden, 2 * cfg.d_model)
        for layer in [*self.film_blocks, self.film_final]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, prs: Tensor, prs_valid: Tensor, present: Tensor) -> tuple[Tensor, list[Tensor]]:
        """-> (cond [B, d_hidden], FiLM tensors per block and final norm); zero where not present."""
        mask = prs_valid.to(prs.dtype)
        cond = self.mlp(torch.cat([prs * mask, mask], dim=-1))
        gate = present.to(cond.dtype)[:, None]
        film = [layer(cond) * gate for layer in [*self.film_blocks, self.film_final]]
        return cond, film

    @property
    def width(self) -> int:
        """d_hidden: the width of the conditioning vector."""
        return int(self.film_final.in_features)


def genomics_features(out: ModelOutput, encoder: GenomicsEncoder | None, n_query: int) -> Tensor:
    """[B, Q, d_hidden] the genomics encoder's conditioning at each of Q queries (static per
    subject), zero where the sample kept no genomics (none, dropped or removed); width 0 without
    an encoder, so batches with and without any genomics line up."""
    b = out.states.shape[0]
    width = 0 if encoder is None else encoder.width
    if out.genomics_cond is None or width == 0:
        return out.states.new_zeros(b, n_query, width)
    gate = out.present["genomics"].to(out.genomics_cond.dtype)[:, None]
    return (out.genomics_cond * gate)[:, None, :].expand(b, n_query, width)


# ----------------------------------------------------------------------------- heads


class WearableReconstructionHead(nn.Module):
    """Backbone state of a masked patch + epoch position -> the C channels of every epoch."""

    position_periods: Tensor  # a buffer (register_buffer in __init__)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        n_freq = 16
        self.register_buffer("position_periods", _log_periods(n_freq, 2.0, 2880.0).float(), persistent=False)
        self.position = nn.Linear(2 * n_freq, cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, N_CHANNELS))

    def forward(self, states: Tensor, n_epochs: int) -> Tensor:
        """[k, d] -> [k, E, C]."""
        positions = torch.arange(n_epochs, device=states.device, dtype=torch.float32)
        pe = self.position(sinusoidal_features(positions, self.position_periods))
        return self.mlp(states[:, None, :] + pe[None])


class FutureCodesHead(nn.Module):
    """Query state -> logits over codes for each horizon: [k, d] -> [k, H, V].

    The horizons share one projection onto the vocabulary (a vocabulary-sized matrix per horizon
    would add H x V x d parameters: 134M at paper size) and differ by a horizon embedding before
    it and a per-horizon bias after it.
    """

    def __init__(self, d: int, vocab_size: int, n_horizons: int) -> None:
        super().__init__()
        self.horizon_embedding = nn.Parameter(torch.randn(n_horizons, d) * 0.02)
        self.hidden = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab_size)
        self.horizon_bias = nn.Parameter(torch.zeros(n_horizons, vocab_size))

    def forward(self, states: Tensor) -> Tensor:
        h = F.gelu(self.hidden(states)[:, None, :] + self.horizon_embedding[None])
        return self.out(h) + self.horizon_bias[None]


class EHRValueHead(nn.Module):
    """(token state [k, d], code [k]) -> the code's normalised value [k]: a token holds several
    valued codes, so the head must be told which one it predicts."""

    def __init__(self, d: int, vocab_size: int) -> None:
        super().__init__()
        self.code = nn.Embedding(vocab_size, VALUE_HIDDEN)
        self.mlp = nn.Sequential(nn.Linear(d + VALUE_HIDDEN, d), nn.GELU(), nn.Linear(d, 1))

    def forward(self, states: Tensor, codes: Tensor) -> Tensor:
        return self.mlp(torch.cat([states, self.code(codes).to(states.dtype)], dim=-1)).squeeze(-1)


def build_heads(
    cfg: ModelConfig, vocab_size: int, n_prs_traits: int, modalities: Collection[str] = MODALITIES
) -> nn.ModuleDict:
    """Pretraining heads of `modalities`. The name prefix is the group: ehr_ (trained by EHR
    alone), wear_ (needs wearables: the cross-modal wearable->EHR heads live here because only a
    site holding wearables can ever train them), prs_ (genomics)."""
    d = cfg.d_model
    heads: dict[str, nn.Module] = {
        "ehr_code": nn.Linear(d, vocab_size),  # masked codes of a token (multi-label)
        "ehr_value": EHRValueHead(d, vocab_size),
        "ehr_next_visit": nn.Linear(d, vocab_size),
        # EHR group: only EHR events give its targets (the query token itself is shared).
        "ehr_future_codes": FutureCodesHead(d, vocab_size, len(cfg.pretraining.future_horizons_days)),
    }
    if "wearables" in modalities:
        heads.update(
            {
                "wear_recon": WearableReconstructionHead(cfg),
                "wear_predictive": nn.Linear(d, vocab_size),
                "wear_align": nn.Linear(d, d),
                "wear_align_ehr": nn.Linear(d, d),
            }
        )
    if "genomics" in modalities:
        heads["prs_recon"] = nn.Linear(cfg.genomics.d_hidden, n_prs_traits)
    return nn.ModuleDict(heads)


# ----------------------------------------------------------------------------- the model


@dataclass
class _Visible:
    """What forward may use of a batch: nothing after prediction_time, dropped modalities removed."""

    ehr: Tensor  # [B, N] events
    wear: Tensor  # [B, P] patches
    epochs: Tensor  # [B, P, E, C] epochs of those patches
    kept: Tensor  # [B, 3] modalities (MODALITIES order) after modality dropout


@dataclass
class _Tokens:
    """One modality's slice of the backbone's input sequence."""

    fed: Tensor  # [B, n, d] as the backbone reads them (masked positions replaced)
    times: Tensor  # [B, n] in days
    valid: Tensor  # [B, n] tokens other tokens may attend to
    encoded: Tensor | None = None  # [B, n, d] encoder outputs, reported in ModelOutput


def _merge(pieces: list[_Tokens]) -> tuple[Tensor, Tensor, Tensor]:
    """The backbone's input sequence: (tokens [B, L, d], times [B, L], key_valid [B, L])."""
    return (
        torch.cat([t.fed for t in pieces], dim=1),
        torch.cat([t.times for t in pieces], dim=1),
        torch.cat([t.valid for t in pieces], dim=1),
    )


def _width(tokens: _Tokens | None) -> int:
    return 0 if tokens is None else tokens.fed.shape[1]


class HealthFM(nn.Module):
    """`modalities`: those the model holds (see model_modalities; None: EHR, wearables, and
    genomics when n_prs_traits >= 1). `n_prs_traits` is what the genomics encoder reads; it is
    0 on a model without genomics whatever was passed."""

    def __init__(
        self, cfg: ModelConfig, vocab_size: int, n_prs_traits: int, modalities: Collection[str] | None = None
    ) -> None:
        super().__init__()
        if vocab_size <= MASK_CODE + 1:
            raise ValueError(f"vocab_size={vocab_size} leaves no room for real codes after the special ids")
        self.modalities = model_modalities(n_prs_traits, modalities)
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.n_prs_traits = n_prs_traits if "genomics" in self.modalities else 0
        # Built in this order whatever the modalities, so a full model's seeded init is unchanged.
        self.ehr_encoder = EHREncoder(cfg, vocab_size)
        self.wearable_encoder: WearableEncoder | None = WearableEncoder(cfg) if "wearables" in self.modalities else None
        self.genomics_encoder: GenomicsEncoder | None = (
            GenomicsEncoder(cfg, n_prs_traits) if "genomics" in self.modalities else None
        )
        self.backbone = Backbone(cfg)
        self.heads = build_heads(cfg, vocab_size, self.n_prs_traits, self.modalities)
        self.apply(self._init_weights)
        if self.genomics_encoder is not None:
            for layer in [*self.genomics_encoder.film_blocks, self.genomics_encoder.film_final]:
                nn.init.zeros_(layer.weight)  # start FiLM at identity (re-zero after _init_weights)
                nn.init.zeros_(layer.bias)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    # -- inputs ------------------------------------------------------------------------------

    def _check_batch(self, batch: Batch) -> None:
        """Shapes against the model; a modality the model lacks may only come as empty padding."""
        if "genomics" in self.modalities:
            if batch.prs.shape[-1] != self.n_prs_traits:
                raise ValueError(f"batch.prs has {batch.prs.shape[-1]} traits, the model expects {self.n_prs_traits}")
        elif n := int(batch.prs_valid.any(dim=-1).sum()):
            raise ValueError(
                f"batch.prs_valid: {n} sample(s) carry PRS traits but the model has no genomics "
                f"(built with modalities {list(self.modalities)})"
            )
        if "wearables" in self.modalities:
            if batch.wear_epochs.shape[-1] != N_CHANNELS:
                raise ValueError(f"batch.wear_epochs has {batch.wear_epochs.shape[-1]} channels, expected {N_CHANNELS}")
        elif n := int(batch.wear_valid.any(dim=-1).sum()):
            raise ValueError(
                f"batch.wear_valid: {n} sample(s) carry wearable patches but the model has no "
                f"wearables (built with modalities {list(self.modalities)})"
            )
        if batch.codes.numel() and (top := int(batch.codes.max())) >= self.vocab_size:
            raise ValueError(f"batch.codes holds id {top} >= vocab_size={self.vocab_size}")

    def _modality_dropout(self, present: Tensor, generator: torch.Generator | None) -> Tensor:
        """present [B,3] -> kept [B,3]: drop each whole modality of a sample with prob p, never all."""
        p = self.cfg.modality_dropout
        if not self.training or p == 0:
            return present
        draw = torch.rand(present.shape, generator=generator).to(present.device)
        kept = present & (draw >= p)
        # A sample that would lose everything keeps the present modality with the highest draw.
        lost_all = present.any(dim=1) & ~kept.any(dim=1)
        # Compared with arange, not F.one_hot: that reads its input's range on the host.
        rescue = torch.arange(present.shape[1], device=present.device) == torch.where(present, draw, -1.0).argmax(
            dim=1, keepdim=True
        )
        return kept | (rescue & lost_all[:, None])

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        batch: Batch,
        masks: ReconstructionMasks | None = None,
        generator: torch.Generator | None = None,
        query_time: Tensor | None = None,
    ) -> ModelOutput:
        """Encode every modality present, run the backbone, return token states and masks.

        Uses nothing later than each sample's prediction_time: events after it and wearable
        epochs starting after it are dropped here too (the pipeline already filters them).
        `query_time` [B] (default prediction_time) places the query token earlier, e.g. at a
        pretraining anchor: attention is time-causal and no token reads the query, so its state
        depends only on tokens at or before query_time (and the static genomics conditioning).
        `query_time` [B, Q] places Q query tokens (Q anchors of one sample in one pass: no query
        reads another, so each state is what a single query at that time would give).
        """
        self._check_batch(batch)
        masks = masks or ReconstructionMasks()
        query_time = self._query_times(batch, query_time)
        seen = self._visible(batch, generator)
        ehr = self._embed_ehr(batch, seen, masks.ehr)
        wear = self._embed_wearables(batch, seen, masks.wear)
        query = self._query_tokens(query_time)
        x, times, key_valid = _merge([t for t in (ehr, wear, query) if t is not None])
        x = self.backbone.embed_time(x, times, batch.birth_time.float())
        genomics_cond, film = self._genomics_film(batch, seen, masks.prs)
        states = self.backbone(x, times, key_valid, film)
        n_ehr, n_wear = _width(ehr), _width(wear)
        return ModelOutput(
            states=states,
            times=times,
            key_valid=key_valid,
            n_ehr=n_ehr,
            n_wear=n_wear,
            ehr_valid=seen.ehr[:, :n_ehr],
            wear_valid=seen.wear[:, :n_wear],
            epoch_valid=seen.epochs[:, :n_wear],
            present=dict(zip(MODALITIES, seen.kept.unbind(dim=1))),
            ehr_tokens=ehr.encoded if ehr is not None else None,
            wear_tokens=wear.encoded if wear is not None else None,
            genomics_cond=genomics_cond,
            embedding=states[:, -1],
            queries=states[:, -query_time.shape[1] :],
        )

    def _query_times(self, batch: Batch, query_time: Tensor | None) -> Tensor:
        """[B, Q] query times: prediction_time (Q = 1) unless given as [B] or [B, Q]."""
        pt = batch.prediction_time.float()
        if query_time is None:
            query_time = pt
        elif query_time.shape[:1] != pt.shape or query_time.dim() not in (1, 2) or query_time.numel() == 0:
            raise ValueError(
                f"query_time has shape {tuple(query_time.shape)}, expected {tuple(pt.shape)} (one per "
                f"sample) or ({batch.batch_size}, Q) (Q per sample)"
            )
        return query_time.reshape(batch.batch_size, -1).float()

    def _visible(self, batch: Batch, generator: torch.Generator | None) -> _Visible:
        """Events and wearable epochs up to prediction_time, then whole modalities dropped."""
        pt = batch.prediction_time.float()
        ehr = batch.ehr_valid & (batch.times <= pt[:, None])
        n_epochs = batch.wear_epochs.shape[2]
        epoch_start = batch.wear_times[:, :, None] + EPOCH_DAYS * torch.arange(n_epochs, device=pt.device)
        epochs = batch.wear_epoch_mask & (epoch_start <= pt[:, None, None])[..., None]
        wear = batch.wear_valid & epochs.flatten(2).any(dim=-1)
        present = torch.stack([ehr.any(1), wear.any(1), batch.prs_valid.any(1)], dim=1)
        kept = self._modality_dropout(present, generator)
        wear = wear & kept[:, 1, None]
        return _Visible(ehr=ehr & kept[:, 0, None], wear=wear, epochs=epochs & wear[:, :, None, None], kept=kept)

    def _embed_ehr(self, batch: Batch, seen: _Visible, hidden: Tensor | None) -> _Tokens | None:
        """One token per visible time bucket, pooling its codes; `hidden` [B, N, K] code slots
        are shown as the MASK code without value (a token whose slots are all hidden is a pure
        MASK token). None when no sample has any token (the ehr group then gets no gradient)."""
        valid = seen.ehr
        if not bool(valid.any()):
            return None
        slots = (batch.codes != PAD_CODE) & valid[..., None]
        codes, has_value, values = batch.codes, batch.has_value, batch.values
        if hidden is not None:
            hide = hidden & slots
            codes = torch.where(hide, torch.full_like(codes, MASK_CODE), codes)
            has_value = has_value & ~hide
            values = values.masked_fill(hide, 0.0)
        tokens = self.ehr_encoder(codes, values.float(), has_value & slots, slots)
        return _Tokens(fed=tokens, times=batch.times.float(), valid=valid, encoded=tokens)

    def _embed_wearables(self, batch: Batch, seen: _Visible, hidden: Tensor | None) -> _Tokens | None:
        """One token per visible patch, at the time the patch is complete (capped at
        prediction_time); masked patches fed as the mask token. None when no sample has any."""
        valid = seen.wear
        if self.wearable_encoder is None:
            return None
        patches = valid.nonzero(as_tuple=True)  # read once: the patches to encode, and whether any
        if patches[0].numel() == 0:
            return None
        flat = self.wearable_encoder(batch.wear_epochs[patches].float(), seen.epochs[patches])
        tokens = flat.new_zeros(*valid.shape, flat.shape[-1]).index_put(patches, flat)
        fed = tokens
        if hidden is not None:
            hide = (hidden & valid)[..., None]
            fed = torch.where(hide, self.wearable_encoder.mask_token.to(fed.dtype), fed)
        return _Tokens(fed=fed, times=batch.wear_token_times(), valid=valid, encoded=tokens)

    def _query_tokens(self, query_time: Tensor) -> _Tokens:
        """Query tokens at query_time [B, Q]: each reads the history up to then; no token reads them."""
        b, n_query = query_time.shape
        fed = self.backbone.query_token.expand(b, n_query, -1)
        return _Tokens(
            fed=fed, times=query_time, valid=torch.zeros(b, n_query, dtype=torch.bool, device=query_time.device)
        )

    def _genomics_film(
        self, batch: Batch, seen: _Visible, hidden: Tensor | None
    ) -> tuple[Tensor | None, list[Tensor] | None]:
        """(conditioning [B, d_hidden], FiLM per block) from the PRS traits not hidden; (None, None)
        when no sample keeps genomics."""
        present = seen.kept[:, 2]
        if self.genomics_encoder is None or not bool(present.any()):
            return None, None
        shown = batch.prs_valid & present[:, None]
        if hidden is not None:
            shown = shown & ~hidden
        return self.genomics_encoder(batch.prs.float(), shown, present)

    @property
    def embedding_width(self) -> int:
        return embedding_width(self.cfg, self.modalities)

    def embed(self, batch: Batch) -> Tensor:
        """[B, embedding_width] representation at prediction_time: the query token's final state,
        then (on a model with genomics) the genomics encoder's conditioning, zero where the sample
        has no PRS. Why both: genomics reaches the query state only through FiLM, which starts at
        identity, and at a federation's budget the query state holds almost none of the PRS while
        the conditioning holds it (issue 31's diagnosis, docs/evidence.md "Genomics")."""
        out = self.forward(batch)
        return self._with_genomics(out, out.embedding[:, None])[:, 0]

    def embed_at(self, batch: Batch, query_time: Tensor) -> Tensor:
        """[B, Q, embedding_width] representations at query_time [B, Q] (at or before each
        prediction_time), one pass: what `embed` gives for a sample whose tokens are this one's up
        to that time (healthfm_core/data/sequences/shared_passes.py says when that is the sample cut at that
        time)."""
        out = self.forward(batch, query_time=query_time)
        return self._with_genomics(out, out.queries)

    def _with_genomics(self, out: ModelOutput, queries: Tensor) -> Tensor:
        if self.genomics_encoder is None:
            return queries
        return torch.cat([queries, genomics_features(out, self.genomics_encoder, queries.shape[1])], dim=-1)

    def pretraining_losses(
        self,
        batch: Batch,
        weights: ObjectiveWeights,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Every pretraining loss by name plus the balanced weighted "total" (see objectives.py)."""
        return pretraining_losses(self, batch, weights, generator)

    # -- reports -----------------------------------------------------------------------------

    def decay_rate_summary(self) -> dict[str, float]:
        """Range of the learned decay rates over all layers and heads (log it: collapse shows here)."""
        return decay_rate_summary(self)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class ModelSetup(Protocol):
    """What building the federation's model reads of its setup (protocol/setup.py FederationSetup)."""

    @property
    def model(self) -> ModelConfig: ...
    @property
    def model_seed(self) -> int: ...
    @property
    def modalities(self) -> list[str]: ...
    @property
    def vocabulary(self) -> VocabularySize: ...


class VocabularySize(Protocol):
    """What the model's shape reads of the agreed vocabulary (data/vocab.py Vocabulary)."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def n_prs_traits(self) -> int: ...


def init_model(setup: ModelSetup) -> HealthFM:
    """The setup's model at its seeded initialisation (server and sites get the same weights),
    built without disturbing the caller's global torch RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(setup.model_seed)
        return HealthFM(setup.model, setup.vocabulary.vocab_size, setup.vocabulary.n_prs_traits, setup.modalities)
