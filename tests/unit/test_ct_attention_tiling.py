"""Which tiling the Triton kernels launch with on a card, from its shared memory a block.

Pure host-side logic (no GPU, no triton): ``tiling.fitted_config`` must never hand a card a tiling
whose shared-memory bound exceeds what the card has, must give every model config's head dim a
tiling on every card the project compiles for, and must leave the H100's tiling as it was. That
the bound is above what triton really allocates is checked by compiling (test_ct_attention_aot.py,
slow).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from healthfm_core.kernels.ct_attention import support, tiling
from healthfm_core.kernels.ct_attention.aot import HEAD_DIMS, SHARED_LIMIT, TRAINING_HEAD_DIMS
from healthfm_core.kernels.ct_attention.support import check_supported

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
T4 = 65_536  # the smallest limit a CUDA card since sm_75 has (sm_75 itself gets the reference: MIN_CAPABILITY)
BACKWARD = ("_ct_bwd_dkdv", "_ct_bwd_dq")


def _bound(kernel: str, t: tiling.Tiling, head_dim: int, dtype: torch.dtype) -> int:
    return tiling.shared_memory_bound(kernel, t, head_dim, dtype.itemsize)


@pytest.mark.parametrize("limit", [*sorted(SHARED_LIMIT.values()), T4, 48 * 1024])
def test_a_fitted_tiling_is_within_the_card_and_the_largest_that_is(limit: int) -> None:
    for head_dim, dtype in itertools.product(range(1, 257), DTYPES):
        config = tiling.fitted_config(head_dim, dtype, limit)
        forward, backward = tiling.TILINGS[head_dim > 64]
        fwd_fits = [t for t in forward if _bound("_ct_fwd", t, head_dim, dtype) <= limit]
        bwd_fits = [t for t in backward if all(_bound(k, t, head_dim, dtype) <= limit for k in BACKWARD)]
        if not fwd_fits or not bwd_fits:
            assert config is None, (head_dim, dtype, limit)
            continue
        assert config is not None, (head_dim, dtype, limit)
        # The first that fits of each list: nothing preferred is given up for nothing.
        assert (config.forward, config.backward) == (fwd_fits[0], bwd_fits[0])


def test_the_models_head_dims_have_a_tiling_on_every_card_in_every_dtype() -> None:
    for head_dim, dtype, limit in itertools.product(TRAINING_HEAD_DIMS, DTYPES, [*SHARED_LIMIT.values(), T4]):
        assert tiling.fitted_config(head_dim, dtype, limit) is not None, (head_dim, dtype, limit)
    # Every head dim the kernels take fits an H100 and an A100 in every dtype.
    for head_dim, dtype, arch in itertools.product(HEAD_DIMS, DTYPES, (80, 90)):
        assert tiling.fitted_config(head_dim, dtype, SHARED_LIMIT[arch]) is not None, (head_dim, dtype, arch)


def test_an_h100_and_no_limit_get_the_preferred_tiling() -> None:
    for head_dim in (16, 32, 48, 64, 128):
        preferred = tiling.default_config(head_dim)
        assert tiling.fitted_config(head_dim, torch.bfloat16, None) == preferred
        assert tiling.fitted_config(head_dim, torch.bfloat16, SHARED_LIMIT[90]) == preferred
    # The paper model's launch (head dim 64, bf16) is the same tiling on every card compiled for.
    for limit in SHARED_LIMIT.values():
        assert tiling.fitted_config(64, torch.bfloat16, limit) == tiling.default_config(64)


def test_a_99_kib_card_gives_up_stages_before_tile_size() -> None:
    # fp32 at head dim 64 (a site training without autocast) on an L4 or L40S: the forward drops
    # a stage; the backward, already at one stage past the first tiling, narrows its key tiles.
    config = tiling.fitted_config(64, torch.float32, SHARED_LIMIT[89])
    assert config is not None
    assert config.forward == (64, 64, 4, 2) and config.backward == (64, 32, 4, 1)
    # Every head dim the kernels take has a tiling on such a card, in every dtype.
    for head_dim, dtype in itertools.product(HEAD_DIMS, DTYPES):
        assert tiling.fitted_config(head_dim, dtype, SHARED_LIMIT[89]) is not None, (head_dim, dtype)


def test_the_bound_grows_with_every_dimension_of_a_tiling() -> None:
    base = (64, 64, 4, 2)
    for kernel in ("_ct_fwd", *BACKWARD):
        b = tiling.shared_memory_bound(kernel, base, 64, 2)
        assert tiling.shared_memory_bound(kernel, (128, 64, 4, 2), 64, 2) > b
        assert tiling.shared_memory_bound(kernel, (64, 128, 4, 2), 64, 2) > b
        assert tiling.shared_memory_bound(kernel, (64, 64, 4, 3), 64, 2) > b
        assert tiling.shared_memory_bound(kernel, base, 128, 2) > b
        assert tiling.shared_memory_bound(kernel, base, 64, 4) > b
    with pytest.raises(ValueError, match="unknown kernel"):
        tiling.shared_memory_bound("_ct_other", base, 64, 2)


def test_cpu_tensors_have_no_shared_memory_limit() -> None:
    q = torch.zeros(1, 1, 4, 256)
    assert check_supported(q, q, q, torch.zeros(1, 4)) is None
    assert check_supported(q[..., :8], q, q, torch.zeros(1, 4)) is not None  # a v of another head dim


def test_a_card_older_than_ampere_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: the card is what torch would report (support.device_capability). On sm_75 triton
    # compiles the products to FMA loops (docs/performance.md, "Fits the card it runs on").

    q = torch.zeros(1, 1, 4, 16)
    monkeypatch.setattr(support, "device_shared_memory", lambda device: 64 * 1024)
    monkeypatch.setattr(support, "device_capability", lambda device: (7, 5))
    why = check_supported(q, q, q, torch.zeros(1, 4))
    assert why is not None and "compute capability 7.5; the kernel needs 8.0 or newer" in why
    for capability in ((8, 0), (8, 6), (9, 0), (12, 0)):
        monkeypatch.setattr(support, "device_capability", lambda device, c=capability: c)
        assert check_supported(q, q, q, torch.zeros(1, 4)) is None, capability


def test_a_card_no_tiling_fits_or_whose_properties_cannot_be_read_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: the card's limit is what triton's driver would report (support.device_shared_memory).

    q = torch.zeros(1, 1, 4, 64)
    monkeypatch.setattr(support, "device_shared_memory", lambda device: 16 * 1024)
    why = check_supported(q, q, q, torch.zeros(1, 4))
    assert why is not None and "no tiling fits its 16384 bytes" in why
    assert check_supported(q[..., :16], q[..., :16], q[..., :16], torch.zeros(1, 4)) is None  # 16 wide fits

    def unreadable(device: torch.device) -> int:
        raise RuntimeError("cuda_utils did not build")

    monkeypatch.setattr(support, "device_shared_memory", unreadable)
    why = check_supported(q, q, q, torch.zeros(1, 4))
    assert why is not None and "could not read its properties (RuntimeError: cuda_utils did not build)" in why
