"""Counted work: the FLOPs a model function really runs, measured with ``torch.utils.flop_counter``.

A cache's speed-up in FLOPs is the ratio of the FLOPs counted while sampling uncached and cached on the same
inputs, so whatever a policy adds (its indicator, forecast arithmetic, gathers and scatters) is paid for.
PyTorch's counter knows matrix products and convolutions; this adds the CPU fused-attention kernel (same
formula as the other attention kernels) and element-wise arithmetic, reductions, normalisation and index
copies at one FLOP per element touched (five for a layer norm), so the cost of a cached call is not flattered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _output_elements(*args, out_shape=None, **kwargs) -> int:
    return math.prod(out_shape) if out_shape is not None else 0


def _input_elements(shape, *args, **kwargs) -> int:
    return math.prod(shape) if isinstance(shape, tuple | list | torch.Size) else 0


def _layer_norm(shape, *args, **kwargs) -> int:
    return 5 * math.prod(shape)


def _cpu_attention(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


ELEMENTWISE = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar,
               aten.add.Scalar, aten.div.Scalar, aten.abs.default, aten.where.self, aten.clamp_min.default,
               aten.silu.default, aten.gelu.default, aten.tanh.default, aten.index_select.default,
               aten.index_copy.default, aten.gather.default, aten.scatter.src, aten.pow.Scalar)  # fmt: skip
REDUCTIONS = (aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.linalg_vector_norm.default)

COUNTS: dict[Any, Callable[..., int]] = {
    **{op: _output_elements for op in ELEMENTWISE},
    **{op: _input_elements for op in REDUCTIONS},
    aten.native_layer_norm.default: _layer_norm,
    aten._scaled_dot_product_flash_attention_for_cpu.default: _cpu_attention,
}


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` with ditlab's additions (see the module docstring)."""
    return FlopCounterMode(display=False, custom_mapping=COUNTS)


class Counted:
    """Wraps a model function and adds up the FLOPs of every call (``flops``) and the calls (``calls``).

    Sampling through it is slower (every operation is dispatched through the counter), so time a run and count
    its FLOPs in separate runs.
    """

    def __init__(self, model: Callable[..., torch.Tensor]) -> None:
        self.model, self.flops, self.calls = model, 0, 0
        self.config = getattr(model, "config", None)

    def parameters(self):
        return self.model.parameters()

    def reset(self) -> None:
        reset = getattr(self.model, "reset", None)
        if callable(reset):
            reset()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with flop_counter() as counter:
            output = self.model(x, t, y)
        self.flops += counter.get_total_flops()
        self.calls += 1
        return output


def counted_flops(run: Callable[[], Any]) -> int:
    """FLOPs of ``run()``, counted as :class:`Counted` counts them."""
    with flop_counter() as counter:
        run()
    return counter.get_total_flops()
