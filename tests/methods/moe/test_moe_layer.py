"""The ``moe`` feed-forward kind: one dispatch path, the closed forms of the DiT-MoE spec, balance loss, accounting."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ditlab.methods.moe.layer import MoEFeedForward, MoEOptions
from ditlab.methods.moe.routing import balance_loss, expert_choice, token_choice
from ditlab.models.budget import activated_parameter_count, flops_per_image, parameter_count
from ditlab.models.components import pop_aux_losses
from ditlab.models.config import DiTConfig
from ditlab.models.mlp import DenseMLP

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)
OPTIONS = {"num_experts": 4, "top_k": 2, "expert_hidden": 24, "shared_hidden": 16}


def layer(**changes) -> MoEFeedForward:
    config = DiTConfig(**TINY, mlp="moe", mlp_options={**OPTIONS, **changes})
    return MoEFeedForward(config.hidden_size, MoEOptions.from_config(config), config.num_tokens)


def brute_force(moe: MoEFeedForward, tokens: torch.Tensor) -> torch.Tensor:
    """Token by token: the shared expert plus each chosen expert's output times its gate."""
    routing = moe.route(tokens)
    flat = tokens.reshape(-1, tokens.shape[-1])
    out = torch.stack([moe.shared(0, row[None])[0] for row in flat]) if moe.shared is not None else torch.zeros_like(flat)
    out = out.clone()
    for row, expert, weight in zip(routing.token.tolist(), experts_of(routing), routing.weight):
        out[row] += weight * moe.experts(expert, flat[row][None])[0]
    return out.reshape(tokens.shape) + (moe.bias if moe.bias is not None else 0)


def experts_of(routing) -> list[int]:
    return [e for e, count in enumerate(routing.counts.tolist()) for _ in range(count)]


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_train_mode_forward_equals_eval_mode_forward(routing):
    torch.manual_seed(0)
    dit = DiTConfig(**TINY, mlp="moe", mlp_options={**OPTIONS, "routing": routing}).build()
    for block in dit.blocks:  # adaLN-Zero starts every block as the identity: open the gates
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.2)
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.2)
    x, t, y = torch.randn(5, 1, 8, 8), torch.tensor([1.0, 50, 300, 700, 999]), torch.tensor([0, 3, 5, 7, 9])
    keep = torch.zeros(5, dtype=torch.long)  # no label drop-out in either mode
    train = dit.train()(x, t, y, force_drop_ids=keep)
    assert set(pop_aux_losses(dit)) == ({"loss_balance"} if routing == "token_choice" else set())
    evaluated = dit.eval()(x, t, y, force_drop_ids=keep)
    torch.testing.assert_close(train, evaluated, atol=1e-5, rtol=0)
    assert train.abs().max() > 0.1  # the blocks did something


@pytest.mark.parametrize("gate", ["softmax", "normalized"])
def test_identical_experts_give_the_closed_form(gate):
    torch.manual_seed(1)
    moe = layer(gate=gate)
    with torch.no_grad():
        for weight in moe.experts.projections():
            weight.copy_(weight[:1].expand_as(weight))
    tokens = torch.randn(3, 16, 32)
    chosen = moe.route(tokens).probs.topk(2, dim=-1).values.sum(-1, keepdim=True)  # sum of the top-K s
    flat = tokens.reshape(-1, 32)
    expert = moe.experts(0, flat).reshape(tokens.shape)
    shared = moe.shared(0, flat).reshape(tokens.shape)
    expected = (chosen if gate == "softmax" else 1.0) * expert + shared
    torch.testing.assert_close(moe(tokens), expected, atol=1e-6, rtol=1e-5)


def test_balance_loss_is_alpha_uniform_and_alpha_e_over_k_collapsed_and_trains_the_router():
    experts, top_k, alpha = 8, 2, 0.01
    tokens = torch.arange(16)
    uniform = torch.stack([tokens % experts, (tokens + 1) % experts], dim=-1)[None]  # every expert chosen 4 times
    probs = torch.full((1, 16, experts), 1 / experts)
    assert balance_loss(probs, uniform, experts, alpha).item() == pytest.approx(alpha, rel=1e-6)
    collapsed = torch.tensor([0, 1]).expand(1, 16, 2)  # every token -> experts 0 and 1, all probability on them
    probs = torch.zeros(1, 16, experts)
    probs[..., :2] = 0.5
    assert balance_loss(probs, collapsed, experts, alpha).item() == pytest.approx(alpha * experts / top_k, rel=1e-6)
    assert balance_loss(probs, collapsed, experts, alpha, "sequence").item() == pytest.approx(alpha * experts / top_k)

    moe = layer(balance_weight=alpha).train()
    moe(torch.randn(2, 16, 32))
    loss = moe.aux_losses["loss_balance"]
    assert 0 < loss.item() < alpha * experts / top_k
    loss.backward()
    assert moe.router.grad is not None and moe.router.grad.abs().sum() > 0
    assert moe.experts.up.grad is None  # only the probabilities carry gradient

    moe(torch.randn(0, 16, 32))  # no token at all (a block every image skipped): zero, not NaN, still in the graph
    assert moe.aux_losses["loss_balance"].item() == 0 and moe.aux_losses["loss_balance"].requires_grad


def test_every_token_gets_exactly_k_routed_contributions_and_nothing_is_dropped():
    torch.manual_seed(2)
    moe = layer(top_k=3).eval()
    tokens = torch.randn(4, 16, 32)
    routing = moe.route(tokens)
    per_token = torch.bincount(routing.token, minlength=64)
    assert torch.equal(per_token, torch.full((64,), 3))
    assert int(routing.counts.sum()) == 64 * 3
    torch.testing.assert_close(moe(tokens), brute_force(moe, tokens), atol=1e-5, rtol=1e-5)


def test_expert_choice_fills_every_expert_per_image_and_matches_brute_force():
    torch.manual_seed(3)
    moe = layer(routing="expert_choice", capacity_factor=1.0, gate="straight_through").eval()
    tokens = torch.randn(2, 16, 32)
    routing = moe.route(tokens)
    capacity = moe.capacity(16)  # 1.0 * 16 tokens * K=2 / E=4
    assert capacity == 8 and torch.equal(routing.counts, torch.full((4,), 2 * capacity))
    images = routing.token // 16
    assert all(torch.equal(torch.bincount(images[routing.token.new_tensor(experts_of(routing)) == e], minlength=2),
                           torch.tensor([capacity, capacity])) for e in range(4))  # fmt: skip
    torch.testing.assert_close(moe(tokens), brute_force(moe, tokens), atol=1e-5, rtol=1e-5)
    assert moe.routed_per_token(16) == 2.0


def test_routing_functions_agree_with_their_definitions():
    logits = torch.randn(2, 5, 4)
    routing = token_choice(logits, 2, "normalized")
    assert torch.allclose(torch.zeros(10).index_add(0, routing.token, routing.weight), torch.ones(10))
    routing = expert_choice(logits, 3, "straight_through")
    assert torch.all(routing.weight == 1) and routing.token.numel() == 4 * 2 * 3


def test_parameters_and_flops_count_what_a_token_computes():
    torch.manual_seed(4)
    moe = layer()
    per_expert = 3 * 32 * 24
    assert moe.activated_parameters() == 4 * 32 + 3 * 32 * 16 + 2 * per_expert  # router + shared + K experts
    tokens = torch.randn(1, 16, 32)
    with FlopCounterMode(display=False) as counter:
        moe(tokens)
    assert counter.get_total_flops() == 2 * moe.macs(16)  # measured = counted (router, shared, 2 experts/token)

    dit = DiTConfig(**TINY, mlp="moe", mlp_options={**OPTIONS, "blocks": [1]}).build()
    assert isinstance(dit.blocks[0].mlp, DenseMLP) and isinstance(dit.blocks[1].mlp, MoEFeedForward)
    dense = DiTConfig(**TINY).build()
    moe_block, dense_block = dit.blocks[1].mlp, dense.blocks[1].mlp
    assert flops_per_image(dit) - flops_per_image(dense) == 2 * (moe_block.macs(16) - dense_block.macs(16))
    inactive = sum(p.numel() for p in moe_block.parameters()) - moe_block.activated_parameters()
    assert activated_parameter_count(dit) == parameter_count(dit) - inactive == parameter_count(dit) - 2 * per_expert


@pytest.mark.parametrize("options, message", [
    ({"top_k": 5}, r"mlp_options.top_k=5 exceeds num_experts=4; choose top_k <= num_experts"),
    ({"experts": 4}, r"unknown mlp_options \['experts'\] for the moe MLP"),
    ({"gate": "sigmoid"}, r"mlp_options.gate='sigmoid'; choices"),
    ({"routing": "expert_choice", "gate": "normalized"}, r"needs routing='token_choice'"),
    ({"blocks": [0, 2]}, r"mlp_options.blocks has \[2\] outside 0..1"),
])  # fmt: skip
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message) as error:
        DiTConfig(**TINY, mlp="moe", mlp_options={**OPTIONS, **options}).build()
    assert "\n" not in str(error.value)
