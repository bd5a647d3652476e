"""What a network costs: parameters (total and activated) and forward FLOPs per image.

FLOPs are ``2 x`` the multiply-accumulates of every matrix product, counted by asking each block
component (:mod:`ditlab.models.components`), so a new attention or MLP kind is counted by its own
``macs(num_tokens)``. Counted: the patch-embedding convolution, the timestep MLP, every block's adaLN
linear and components (for full attention: qkv, ``q k^T`` and ``attn v`` as ``2 N^2 H Dh``, proj; for the
dense MLP: fc1 and fc2), and the final layer's adaLN and linear; for a text-conditioned network also the caption
projection over ``condition_options.text_length`` tokens, the pooled projection and PixArt's shared adaLN-single
linear (text blocks count their cross-attention or text stream themselves). Not counted (elementwise, ``O(N D)``):
biases, LayerNorm, softmax, GELU/SiLU, modulation, residual adds, the position embedding and the label
lookup. For the dense DiT this is what ``torch.utils.flop_counter.FlopCounterMode`` counts (it misses
fused CPU attention kernels), and half of it is the DiT paper's "Gflops" (fvcore counts MACs).
"""

from __future__ import annotations

from torch import nn

from ditlab.models.dit import DiT


def parameter_count(network: nn.Module) -> int:
    """All parameters, the frozen position embedding included (the count the DiT paper reports)."""
    return sum(p.numel() for p in network.parameters())


def activated_parameter_count(network: nn.Module) -> int:
    """Parameters one token uses: a component with ``activated_parameters()`` (sparse experts) reports its own,
    everything else counts in full."""
    total = 0

    def visit(module: nn.Module) -> None:
        nonlocal total
        if hasattr(module, "activated_parameters"):
            total += int(module.activated_parameters())
            return
        total += sum(p.numel() for p in module.parameters(recurse=False))
        trunk = getattr(module, "trunk", None)
        routed = trunk is not None and hasattr(module, "blocks")
        for name, child in module.named_children():
            if not (routed and name == "blocks"):
                visit(child)
        if routed:  # the trunk says what share of the blocks an image runs (Mixture of Blocks)
            total += trunk.per_image([activated_parameter_count(block) for block in module.blocks])

    visit(network)
    return total


def flops_per_image(dit: DiT) -> int:
    """Forward FLOPs for one image (see the module docstring for what is counted)."""
    config = dit.config
    tokens = dit.x_embedder.num_patches
    macs = tokens * dit.x_embedder.proj.weight.numel()  # (D, C, p, p) per token
    macs += sum(m.weight.numel() for m in dit.t_embedder.mlp if isinstance(m, nn.Linear))
    length = dit.trunk.block_tokens(tokens)  # a merging trunk (D2iT's coarse regions) runs its blocks shorter
    macs += dit.trunk.per_image([block.macs(length, config) for block in dit.blocks])
    macs += dit.trunk.macs(tokens)  # a routing trunk's routers (its savings depend on the input)
    macs += int(getattr(dit.y_embedder, "macs", lambda: 0)())  # the text path (caption projection, pooled, adaLN-single)
    final = dit.final_layer
    modulation = getattr(final, "adaLN_modulation", None)  # PixArt's table head has no linear
    macs += (modulation[-1].weight.numel() if modulation is not None else 0) + tokens * final.linear.weight.numel()
    return 2 * macs
