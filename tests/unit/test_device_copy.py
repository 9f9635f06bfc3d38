"""Host data onto the device without a host sync (healthfm_core/device_copy.py)."""

from __future__ import annotations

import pytest
import torch
from helpers.random_batch import random_batch

from healthfm_core.device_copy import device_values, to_device


def test_values_take_the_dtype_and_device_of_the_tensor_they_go_with() -> None:
    like = torch.zeros(3, dtype=torch.bfloat16)
    got = device_values([1.5, 2.0, 30.0], like)
    assert got.dtype == torch.bfloat16 and got.device == like.device
    assert got.tolist() == [1.5, 2.0, 30.0]  # all exact in bf16
    x = torch.arange(4.0)
    assert to_device(x, "cpu") is x  # nothing to copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu_checks.sh runs it)")
def test_a_copy_to_the_gpu_does_not_wait_for_the_queued_work() -> None:
    stream = torch.cuda.current_stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of a busy stream at ~2 GHz
    like = torch.zeros(1, device="cuda")
    values = device_values([30.0, 90.0], like)
    batch = random_batch(batch_size=4, n_events=8, n_patches=2, epochs_per_patch=4, vocab_size=50, seed=0).to("cuda")
    # Had either copy waited for the device, the sleep queued before it would be over.
    assert not stream.query(), "a copy waited for the device"
    torch.cuda.synchronize()
    assert values.tolist() == [30.0, 90.0] and batch.codes.is_cuda
    host = random_batch(batch_size=4, n_events=8, n_patches=2, epochs_per_patch=4, vocab_size=50, seed=0)
    assert torch.equal(batch.codes.cpu(), host.codes) and torch.equal(batch.times.cpu(), host.times)
