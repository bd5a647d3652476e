"""run_blocks: reading hidden states and attention maps, skipping, replacing and stopping early."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from ditlab.models.dit import DiT
from ditlab.models.taps import Tapped, block_io, kept_blocks, run_blocks

DEPTH, HEADS, HIDDEN, TOKENS = 5, 4, 32, 16


@pytest.fixture(scope="module")
def perturbed_dit(tiny_dit):
    """This file's DiT: 4 channels, 5 blocks of 4 heads, 3 classes, random adaLN (no block is the identity)."""
    return partial(tiny_dit, in_channels=4, hidden_size=HIDDEN, depth=DEPTH, num_heads=HEADS, num_classes=3)


@pytest.fixture(scope="module")
def dit(perturbed_dit) -> DiT:
    return perturbed_dit()


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    return x, torch.tensor([17.0, 640.0]), torch.tensor([0, 2])


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_no_taps_equals_plain_forward(dit, batch):
    tapped = run_blocks(dit, *batch)
    assert isinstance(tapped, Tapped) and tapped.hidden == {} and tapped.attention == {}
    close(tapped.output, dit(*batch))
    assert tapped.output.abs().mean() > 1e-3


@torch.no_grad()
@pytest.mark.parametrize("layers", [[0], [-1, 4], [1, 2, 3], list(range(-1, DEPTH))])
def test_hidden_and_attention_captures(dit, batch, layers):
    attention_layers = [i for i in layers if i >= 0]
    tapped = run_blocks(dit, *batch, hidden=layers, attention=attention_layers)
    close(tapped.output, dit(*batch))  # capturing does not change the result
    assert sorted(tapped.hidden) == sorted(layers)
    assert sorted(tapped.attention) == sorted(attention_layers)
    # independent reference: walk the blocks by hand
    tokens, cond = dit.embed(*batch)
    reference = {-1: tokens}
    for index, block in enumerate(dit.blocks):
        tokens = block(tokens, cond)
        reference[index] = tokens
    for index in layers:
        assert tapped.hidden[index].shape == (2, TOKENS, HIDDEN)
        close(tapped.hidden[index], reference[index])
    for index in attention_layers:
        weights = tapped.attention[index]
        assert weights.shape == (2, HEADS, TOKENS, TOKENS)
        close(weights.sum(-1), torch.ones(2, HEADS, TOKENS))
        # it is the map of that block's own input
        _, expected = dit.blocks[index](reference[index - 1], cond, return_attention=True)
        close(weights, expected)


@torch.no_grad()
def test_block_io_lists_every_boundary(dit, batch):
    states = block_io(dit, *batch)
    assert len(states) == DEPTH + 1
    tokens, cond = dit.embed(*batch)
    close(states[0], tokens)
    close(dit.head(states[-1], cond), dit(*batch))
    for before, after, block in zip(states[:-1], states[1:], dit.blocks):
        close(block(before, cond), after)
        assert not torch.allclose(before, after)


@torch.no_grad()
@pytest.mark.parametrize("skip", [[0], [1, 3], [0, 2, 4], list(range(DEPTH))])
def test_skip_equals_dit_built_from_kept_blocks(dit, batch, skip):
    keep = [i for i in range(DEPTH) if i not in skip]
    shallow = DiT(dit.config.replace(depth=len(keep)))
    state = {k: v for k, v in dit.state_dict().items() if not k.startswith("blocks.")}
    shallow.load_state_dict(state, strict=False)
    shallow.blocks = kept_blocks(dit, keep)
    shallow.eval()
    assert shallow.depth == len(keep)
    skipped = run_blocks(dit, *batch, skip=skip).output
    close(skipped, shallow(*batch))
    assert not torch.allclose(skipped, dit(*batch), atol=1e-4)


@torch.no_grad()
def test_kept_blocks_shares_weights_in_order(dit):
    kept = kept_blocks(dit, [3, 1, 1])
    assert len(kept) == 2 and kept[0] is dit.blocks[1] and kept[1] is dit.blocks[3]


@torch.no_grad()
def test_replace_with_identity_equals_skip(dit, batch):
    identity = {1: lambda tokens, cond: tokens, 3: lambda tokens, cond: tokens}
    close(run_blocks(dit, *batch, replace=identity).output, run_blocks(dit, *batch, skip=[1, 3]).output)
    # a replacement really runs in place of the block, with the block's conditioning
    calls = []

    def doubled(tokens, cond):
        calls.append((tokens.shape, cond.shape))
        return 2 * dit.blocks[2](tokens, cond)

    replaced = run_blocks(dit, *batch, replace={2: doubled}, hidden=[2])
    assert calls == [((2, TOKENS, HIDDEN), (2, HIDDEN))]
    plain = run_blocks(dit, *batch, hidden=[2])
    close(replaced.hidden[2], 2 * plain.hidden[2])


@torch.no_grad()
@pytest.mark.parametrize("stop", [-1, 0, 2, DEPTH - 1])
def test_stop_after_returns_tokens(dit, batch, stop):
    if stop == -1:  # stopping "after the embedding" is not a block: the pass runs to the head
        close(run_blocks(dit, *batch, stop_after=stop).output, dit(*batch))
        return
    full = run_blocks(dit, *batch, hidden=[stop])
    early = run_blocks(dit, *batch, stop_after=stop, hidden=[stop], attention=range(stop + 1, DEPTH))
    assert early.output.shape == (2, TOKENS, HIDDEN)
    close(early.output, full.hidden[stop])
    assert early.attention == {}  # blocks after stop_after never ran


def test_stop_after_saves_the_later_blocks(perturbed_dit):
    dit = perturbed_dit()
    calls = []
    handles = [
        block.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
        for k, block in enumerate(dit.blocks)
    ]
    x, t, y = torch.randn(1, 4, 8, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    run_blocks(dit, x, t, y, stop_after=1)
    assert calls == [0, 1]
    calls.clear()
    run_blocks(dit, x, t, y, skip=[0, 3])
    assert calls == [1, 2, 4]
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize(
    "kwargs",
    [{"hidden": [DEPTH]}, {"attention": [-2]}, {"skip": [7]}, {"replace": {DEPTH: lambda t, c: t}}],
)
def test_out_of_range_index_raises(dit, batch, kwargs):
    with pytest.raises(IndexError, match=f"out of range for a DiT of depth {DEPTH}"):
        run_blocks(dit, *batch, **kwargs)


def test_gradients_flow_through_captures(perturbed_dit):
    dit = perturbed_dit(depth=2).train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    tapped = run_blocks(dit, x, t, y, hidden=[0])
    tapped.hidden[0].pow(2).mean().backward()
    assert dit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert dit.blocks[1].attn.qkv.weight.grad is None  # block 1 is after the captured state
