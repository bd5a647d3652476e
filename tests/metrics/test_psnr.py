"""Paired PSNR on constructed cases whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from ditlab.metrics.psnr import paired_psnr


def test_a_known_offset_gives_its_psnr_and_an_exact_twin_100_db():
    reference = torch.zeros(3, 1, 4, 4)
    shifted = reference + 0.2  # 0.1 on the [0, 1] scale: mse 0.01, 20 dB
    assert paired_psnr(shifted, reference) == pytest.approx(20.0, abs=1e-4)
    assert paired_psnr(reference, reference) == 100.0
    mixed = torch.cat([reference[:1], shifted[1:]])  # the mean is over samples, not of the pooled error
    assert paired_psnr(mixed, reference) == pytest.approx((100 + 2 * 20) / 3, abs=1e-4)
    assert not math.isnan(paired_psnr(shifted, shifted))
