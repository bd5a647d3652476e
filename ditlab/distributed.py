"""Running one experiment across processes: FSDP2 sharding, activation checkpointing and compile per DiT block.

DDP needs nothing from here (Lightning's ``DDPStrategy`` wraps the module). Sharded training uses
:class:`FSDP2Strategy`, Lightning's ``ModelParallelStrategy`` with every process in one data-parallel
group; the module then calls :func:`shard` in ``configure_model`` (``fully_shard`` on each embedder, DiT block,
final layer and head). That also runs on CPU with gloo, which is how the tests check it. Frozen networks
(teachers, encoders) held outside the module's children are left whole on every process: they never enter
the optimiser, and each process runs them on its own rows.

The EMA copy is sharded like the network it follows, so its update is shard-local and a sample draws
on all processes together (every process must take part in each sharded forward pass).
"""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from ditlab.atomic import DiskFull, out_of_space, replace_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def data_parallel_split(trainer) -> tuple[int, int]:
    """``(rank, world size)`` among the processes that split each batch; ``(0, 1)`` without a trainer."""
    strategy = getattr(trainer, "strategy", None) if trainer is not None else None
    split = getattr(strategy, "distributed_sampler_kwargs", None) or {}
    return int(split.get("rank", 0)), int(split.get("num_replicas", 1))


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes (no tensor parallelism), with a mixed-precision policy.

    Args:
        param_dtype: dtype blocks compute in (their parameters are all-gathered in it); None keeps float32.
            ``bfloat16`` with ``reduce_dtype: float32`` is the usual large-scale policy.
        reduce_dtype: dtype gradients are reduce-scattered in; None: the same as ``param_dtype``.
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3, least memory);
            False keeps them until backward (ZeRO-2-like, less communication).
        save_distributed_checkpoint: each process writes its shard (a checkpoint *folder*, reloadable on
            another number of processes); False gathers one full file on rank 0.
    """

    def __init__(
        self,
        param_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        reduce_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)  # fmt: skip
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # every process in the data-parallel (sharding) dimension; Lightning's "auto" would make them TP ranks
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """A sharded folder appears whole or not at all: every process writes its shard into a temporary sibling
        folder, which rank 0 swaps in once all succeeded. When any process fails (out of space, say), the temporary
        is removed and every process raises, so none is left waiting in a later collective."""
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        from torch.distributed.checkpoint.api import CheckpointException

        path = Path(self.broadcast(str(filepath)))
        temporary = path.with_name(f".{path.name}.tmp-{self.broadcast(os.getpid())}")
        failure: BaseException | None = None
        try:
            super().save_checkpoint(checkpoint, temporary, storage_options)
        except (Exception, CheckpointException) as error:  # DCP's failures are BaseExceptions
            failure = error
        full = out_of_space(failure)
        flags = torch.tensor([float(failure is not None), float(full.errno if full else 0)], device=self.root_device)
        failed, code = self.reduce(flags, reduce_op="max").tolist()
        if self.is_global_zero:
            if failed:
                shutil.rmtree(temporary, ignore_errors=True)
            else:
                replace_folder(temporary, path)
        self.barrier("sharded checkpoint")
        if code:  # out of space on some process: the same one-line error on every process
            raise DiskFull(path, code=int(code)) from failure
        if failure is not None:
            raise failure
        if failed:
            raise RuntimeError(f"another process failed to write its shard of {path} (its error says why); "
                               "the checkpoint was not written")  # fmt: skip

    def load_checkpoint(self, checkpoint_path, *args, **kwargs) -> dict:
        """Let the module rebuild its network at the checkpoint's architecture first (``prepare_checkpoint_load``:
        a compression student resumed past a progressive stage is shallower than the one it starts as), so the
        shards and optimiser state load into matching tensors; then load as usual."""
        prepare = getattr(self.lightning_module, "prepare_checkpoint_load", None)
        if prepare is not None:
            prepare(self.broadcast(checkpoint_path))
        return super().load_checkpoint(checkpoint_path, *args, **kwargs)

    def mixed_precision(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(
            param_dtype=DTYPES[self.param_dtype] if self.param_dtype else None,
            reduce_dtype=DTYPES[self.reduce_dtype] if self.reduce_dtype else None,
        )


def checkpoint_blocks(network: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them (parameter names unchanged)."""
    from torch.distributed._composable import checkpoint

    for block in network.blocks:
        checkpoint(block)


def compile_blocks(network: nn.Module, **options) -> None:
    """``torch.compile`` every block in place (parameter names, taps and state dicts unchanged)."""
    for block in network.blocks:
        block.compile(**options)


def shard(module: nn.Module, strategy: FSDP2Strategy) -> None:
    """``fully_shard`` every unit of ``module``'s networks: each embedder, each DiT block, the final layer, each head.

    There is deliberately no sharded root: taps (``run_blocks``), distillation and alignment call a network's
    embedders, blocks and head directly, and each unit gathers its own weights when it runs. Frozen tensors
    that are not in a unit (DiT's fixed position embedding) stay whole on every process.
    """
    from torch.distributed.fsdp import fully_shard

    options = {"mesh": strategy.device_mesh["data_parallel"], "mp_policy": strategy.mixed_precision(),
               "reshard_after_forward": strategy.reshard_after_forward}  # fmt: skip

    def shard_units(parent: nn.Module) -> None:
        for child in parent.children():
            if not any(True for _ in child.parameters()):
                continue
            if isinstance(child, nn.ModuleList | nn.ModuleDict) or hasattr(child, "blocks"):  # containers, DiTs
                shard_units(child)
            else:
                fully_shard(child, **options)

    shard_units(module)


def gathered(network: nn.Module) -> nn.Module:
    """An unsharded copy of a sharded DiT (every process must call this; each gets the full copy)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(network, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        full = type(network)(network.config)
    full = full.to_empty(device=next(iter(state.values())).device)
    full.load_state_dict({key: local(value) for key, value in state.items()})
    return full.train(network.training)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(child, FSDPModule) for child in module.modules())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor; a plain tensor as is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
