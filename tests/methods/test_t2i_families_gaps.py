"""Method families x text-to-image block kinds (PixArt, SD3 MM-DiT): the outcomes the family table left open, asserted.

- trunks: d2it runs on PixArt (every region fine: the plain PixArt, bit for bit) and refuses MM-DiT; the dico and ddt
  trunks refuse both text block kinds, and the dico block a text condition, each in one line;
- PPCL with every plug off is the teacher, bit for bit, on PixArt and on MM-DiT (the context-pre-only block kept last);
- a learned cache router whose plan computes everything samples what the text teacher samples, bit for bit;
- grafting: parallel pairs and a grid operator (kv-compress, window) on an MM-DiT are refused in one line;
- every registered cache policy at its identity setting on an MM-DiT whose last block is context-pre-only (and on
  PixArt) samples the network bit for bit;
- OFA-KD trains a text-conditioned student against a text-conditioned teacher and refuses, in one line, a student
  that reads another condition; DiT-MoE (``mlp: moe``) trains on PixArt and MM-DiT networks.

The tiny networks, their configs and teacher checkpoints are the method tests' shared ones (``tests/methods/conftest.py``:
8x8 one-channel images, 4 blocks of width 32, the ``random-words`` text encoder, MM-DiT's last block context-pre-only)."""

from __future__ import annotations

import pytest
import torch

from ditlab.diffusion.cache import cache_policies
from ditlab.diffusion.config import SamplingConfig
from ditlab.diffusion.gaussian import GaussianDiffusion
from ditlab.diffusion.sample import sample_images
from ditlab.methods.base import DiffusionModule
from ditlab.methods.compress.ofa_kd import OFAConfig, OFADistillModule
from ditlab.methods.compress.ppcl import Plug, plugged, plugs, replaced_blocks
from ditlab.methods.compress.prune import prune_depth
from ditlab.methods.graft import graft_operator, parallel_pairs
from ditlab.methods.moe import MoEFeedForward
from ditlab.methods.sampling.cache_router import CacheRouterModule, RouterConfig
from ditlab.methods.sampling.caches import build_policy
from ditlab.methods.sampling.caches.plan import Plan
from ditlab.methods.teacher import TeacherConfig
from ditlab.metrics.text_eval import sample_conditions
from ditlab.models.budget import flops_per_image
from ditlab.models.components import pop_aux_losses
from ditlab.models.text.prompts import condition_input
from ditlab.plugins import load_plugins

load_plugins()  # every family's block, trunk and cache-policy kinds, as a config naming them would find them


KINDS = ("pixart", "mmdit")
CAPTIONS = ["a small red 3 left of a large blue 7", "two green ones", "", "a yellow 4 above a white 9 on grey"]
OBJECTIVE, SAMPLER, STEPS, CFG = GaussianDiffusion(learn_sigma=True), "ddim", 5, 2.0


def batch(config, size: int = 4, seed: int = 2):
    """``(x, t, TextFeatures)`` for a tiny text network of ``config``: captions with padding and the empty caption."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 1, 8, 8, generator=generator)
    t = torch.linspace(5.0, 990.0, size)
    return x, t, condition_input(config, [CAPTIONS[i % len(CAPTIONS)] for i in range(size)])


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


# --- 1. trunks x text blocks -------------------------------------------------------------------------------------


def test_d2it_on_pixart_with_every_region_fine_is_the_plain_pixart_bitwise(text_network, text_config):
    """The d2it trunk's docstring: with every region fine (``fine_ratio: 1``) it is the plain block loop, bit for bit."""
    plain = text_network("pixart")
    dynamic = text_config("pixart", trunk="d2it", trunk_options={"fine_ratio": 1.0}).build().eval()
    result = dynamic.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys
    assert all(key.startswith("trunk.") for key in result.missing_keys)  # only the router, merge and restore
    x, t, text = batch(text_config("pixart"))
    with torch.no_grad():
        assert torch.equal(dynamic(x, t, text), plain(x, t, text))
    assert dynamic.trunk.last["tokens"] == 16 and dynamic.trunk.last["fine"] is None
    assert flops_per_image(dynamic) == flops_per_image(plain)


def test_d2it_on_pixart_runs_coarse_regions_on_a_shorter_sequence(text_network, text_config):
    plain = text_network("pixart")
    dynamic = text_config("pixart", trunk="d2it", trunk_options={"fine_ratio": 0.5}).build().eval()
    dynamic.load_state_dict(plain.state_dict(), strict=False)
    x, t, text = batch(text_config("pixart"))
    with torch.no_grad():
        out, reference = dynamic(x, t, text), plain(x, t, text)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert dynamic.trunk.last["tokens"] == dynamic.trunk.sequence_length == 4 * 2 + 2  # 2 of 4 regions fine
    assert dynamic.trunk.last["fine"].sum(1).tolist() == [2] * len(x)
    assert not torch.allclose(out, reference, atol=1e-4)  # the coarse regions are predicted at the coarse grain
    assert flops_per_image(dynamic) < flops_per_image(plain)


def test_d2it_refuses_mmdit_blocks_in_one_line(text_config):
    with pytest.raises(ValueError, match=r"trunk 'd2it' runs mixed-grain token sequences, which 'mmdit' blocks "
                                         r"\(carry \[text; image\] tokens\) cannot follow") as error:  # fmt: skip
        text_config("mmdit", trunk="d2it", trunk_options={"fine_ratio": 1.0}).build()
    assert "(dit, pixart)" in one_line(error)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("trunk, refusal", [
    pytest.param("dico", r"the 'dico' trunk runs only dico blocks, at widths D 2\^level \(got '{kind}'\): set block: "
                         "dico", id="dico"),
    pytest.param("ddt", r"trunk 'ddt' runs head blocks of kind 'ddt-head' \(per-token adaLN\); set block: ddt-head, "
                        "not '{kind}'", id="ddt"),
])  # fmt: skip
def test_dico_and_ddt_trunks_refuse_text_blocks_in_one_line(text_config, kind, trunk, refusal):
    with pytest.raises(ValueError, match=refusal.format(kind=kind)) as error:
        text_config(kind, trunk=trunk).build()
    one_line(error)


@pytest.mark.parametrize("trunk, fields", [("blocks", {}), ("dico", {"trunk_options": {"stages": [1, 2, 1]},
                                                                     "positions": "none"})], ids=["blocks", "dico"])  # fmt: skip
def test_the_dico_block_refuses_a_text_condition_in_one_line(text_config, trunk, fields):
    with pytest.raises(ValueError, match="the 'dico' block reads a class condition vector; use condition: class") as error:
        text_config("pixart", block="dico", trunk=trunk, **fields).build()
    one_line(error)


# --- 2. PPCL plugs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_ppcl_with_every_plug_off_is_the_text_teacher_bitwise(text_network, text_config, kind, perturb):
    """A 6-block teacher, blocks 1..2 replaced by one block and block 3 removed: every plug off rebuilds the teacher
    (the one-to-one blocks, embedders and head are the student's, equal to the teacher's), every plug on is the
    student, bit for bit; on MM-DiT the context-pre-only block (teacher block 5) stays last either way."""
    teacher = text_network(kind, depth=6).requires_grad_(False)
    segments = [(0, 0), (1, 2), (4, 4), (5, 5)]
    student = prune_depth(teacher, [0, 1, 4, 5], spans=segments)
    assert plugs(segments, 6) == [Plug(1, 2, 1), Plug(3, 3, None)]
    for index in replaced_blocks(segments):  # "trained" replacements; everything else stays the teacher's
        perturb(student.blocks[index], seed=index)
    x, t, text = batch(text_config(kind))
    with torch.no_grad():
        expected = teacher(x, t, text)
        off = plugged(teacher, student, segments, [False, False])
        assert torch.equal(off(x, t, text), expected)
        assert off.config == teacher.config
        assert torch.equal(plugged(teacher, student, segments, [True, True])(x, t, text), student(x, t, text))
        for mask, depth in (([True, False], 5), ([False, True], 5)):
            network = plugged(teacher, student, segments, mask)
            assert network.depth == depth and torch.isfinite(network(x, t, text)).all()
            assert not torch.equal(network(x, t, text), expected)
    if kind == "mmdit":
        assert off.blocks[-1].context_pre_only and not any(block.context_pre_only for block in off.blocks[:-1])


# --- 3. a learned router that computes everything ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_router_computing_everything_samples_what_the_text_teacher_samples(text_teacher_file, kind):
    module = CacheRouterModule(teacher=TeacherConfig(checkpoint=str(text_teacher_file(kind))),
                               router=RouterConfig(mode="harmonica", init="constant", init_value=5.0),
                               sampling=SamplingConfig(sampler="ddim", steps=4, cfg_scale=2.0))  # fmt: skip
    module.configure_model()
    teacher = module.teacher
    plan = module.export()
    assert plan.computed_fraction == 1.0 and len(plan.compute[0]) == len(teacher.units())
    features = condition_input(teacher.config, CAPTIONS[:3])
    plain = sample_images(teacher, module.objective, features, sampler="ddim", steps=4, cfg_scale=2.0)
    policy = Plan(teacher, module.schedule(), plan=plan)
    assert torch.equal(sample_images(policy, module.objective, features, sampler="ddim", steps=4, cfg_scale=2.0), plain)
    assert policy.computed_share == 1.0
    assert torch.equal(module.sample(CAPTIONS[:3]), plain.clamp(-1, 1))  # the module's own path, captions encoded
    with torch.no_grad():
        module.router.theta[1:, ::2] = -5.0  # a sparser plan computes less and samples something else
    assert module.export().computed_fraction < 1
    assert not torch.equal(module.sample(CAPTIONS[:3]), plain.clamp(-1, 1))


# --- 4. grafting on MM-DiT -----------------------------------------------------------------------------------------


def test_parallel_pairs_are_refused_on_mmdit_in_one_line(text_network):
    with pytest.raises(ValueError, match="this network has 'mmdit' blocks; pair the blocks of a sequential DiT") as error:
        parallel_pairs(text_network("mmdit"))
    one_line(error)


@pytest.mark.parametrize("operator, options", [("kv-compress", {"ratio": 2}), ("window", {"window": 3})])
def test_grid_operators_grafted_on_mmdit_are_refused_in_one_line(text_network, text_config, operator, options):
    with pytest.raises(ValueError, match=rf"the '{operator}' operator lays tokens out on the image grid, but this "
                                         r"'mmdit' network's joint attention carries \[text; image\]; graft 'clear'"
                       ) as error:  # fmt: skip
        graft_operator(text_network("mmdit"), operator, options)
    one_line(error)
    grafted = graft_operator(text_network("pixart"), operator, options).eval()  # PixArt takes it
    x, t, text = batch(text_config("pixart"))
    with torch.no_grad():
        assert grafted.config.attention == operator and torch.isfinite(grafted(x, t, text)).all()


# --- 5. cache identity settings on a context-pre-only MM-DiT ---------------------------------------------------------

BUILT_IN = sorted(name for name, entry in cache_policies().items() if entry.options.__module__.startswith("ditlab."))


@pytest.mark.parametrize("kind", KINDS)
def test_every_cache_policy_at_its_identity_setting_samples_the_text_network_bitwise(text_network, kind, tmp_path,
                                                                                    cache_identity, identity_cache):
    assert set(BUILT_IN) == set(cache_identity), "declare the identity setting of a new policy in CACHE_IDENTITY"
    network = text_network(kind)
    if kind == "mmdit":
        assert network.blocks[-1].context_pre_only and not any(block.context_pre_only for block in network.blocks[:-1])
    captions = condition_input(network.config, sample_conditions(network.config, 3))
    plain = sample_images(network, OBJECTIVE, captions, seed=5, sampler=SAMPLER, steps=STEPS, cfg_scale=CFG)
    for policy in BUILT_IN:
        settings = identity_cache(policy, network, tmp_path, OBJECTIVE, SAMPLER, STEPS)
        model = build_policy(network, settings, OBJECTIVE, SAMPLER, STEPS,
                             cfg_scale=CFG)  # fmt: skip
        cached = sample_images(model, OBJECTIVE, captions, seed=5, sampler=SAMPLER, steps=STEPS, cfg_scale=CFG)
        assert torch.equal(cached, plain), f"{policy} at its identity setting on {kind}"
        assert model.computed_share == pytest.approx(1.0), f"{policy} on {kind}: {model.computed_share}"


# --- 6. OFA-KD and DiT-MoE on text networks -------------------------------------------------------------------------


def captioned_batch(size: int = 4, seed: int = 0):
    """A loader batch of the digit scenes with captions: ``(images, labels, captions)``."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 1, 8, 8, generator=generator).clamp(-1, 1)
    return images, torch.randint(0, 10, (size,), generator=generator), [CAPTIONS[i % len(CAPTIONS)] for i in range(size)]


@pytest.mark.parametrize("kind", KINDS)
def test_ofa_kd_trains_a_text_student_against_a_text_teacher(text_teacher_file, text_config, kind):
    module = OFADistillModule(teacher=TeacherConfig(checkpoint=str(text_teacher_file(kind))),
                              student=text_config(kind, depth=3), ofa=OFAConfig(eps=1.5, head_blocks=1),
                              ema_decay=None)  # fmt: skip
    module.configure_model()
    student, heads = module.network, module.ofa_heads
    assert student.config.block == kind and student.depth == 3 and heads.stages == [0, 1]
    assert all(head.num_tokens == 16 and head.text_stream == (kind == "mmdit") for head in heads.heads.values())
    images, labels, captions = captioned_batch()
    _, features = module.unpack_batch((images, labels, captions))
    terms = module.training_losses(images, features)
    assert {"loss", "loss_kd_ofa", "loss_kd_output", "loss_diffusion"} <= set(terms)
    assert all(torch.isfinite(value) for value in terms.values()) and float(terms["loss_kd_ofa"]) > 0
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-3)
    before = [p.detach().clone() for p in module.trainable_parameters()]
    loss = module.training_step((images, labels, captions), 0)  # the training step a Trainer runs
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in heads.parameters() if p.requires_grad)
    optimizer.step()
    changed = [not torch.equal(p, b) for p, b in zip(module.trainable_parameters(), before)]
    assert sum(changed) > len(changed) // 2
    assert all(p.grad is None for p in module.teacher.parameters())


def test_ofa_kd_refuses_a_student_that_reads_another_condition_in_one_line(text_teacher_file, teacher_file,
                                                                          text_config, text_kinds):
    mmdit_text = {**text_kinds["mmdit"]["condition_options"], "pooled_dim": 8}
    cases = [
        (text_teacher_file("pixart"), text_config("pixart", block="dit", condition="class", condition_options={},
                                                  depth=3),  # the tiny sizes with DiT's class-conditioned block
         r"model\.student reads class labels but the teacher reads captions through encoder='random-words'"),
        (teacher_file, text_config("pixart", depth=3),
         r"model\.student reads captions through encoder='random-words'.* but the teacher reads class labels"),
        (text_teacher_file("mmdit"), text_config("mmdit", depth=3, condition_options=mmdit_text),
         r"pooled_dim=8 but the teacher reads captions .*pooled_dim=16"),
    ]  # fmt: skip
    for teacher, student, refusal in cases:
        module = OFADistillModule(teacher=TeacherConfig(checkpoint=str(teacher)), student=student, ema_decay=None)
        with pytest.raises(ValueError, match=refusal) as error:
            module.configure_model()
        assert "give the student the teacher's condition" in one_line(error)


@pytest.mark.parametrize("kind", KINDS)
def test_dit_moe_trains_on_a_text_network(text_config, kind):
    moe = {"num_experts": 4, "top_k": 2, "expert_hidden": 32, "shared_hidden": 16, "balance_weight": 0.01}
    torch.manual_seed(0)
    module = DiffusionModule(network=text_config(kind, mlp="moe", mlp_options=moe), ema_decay=None)
    network = module.network.train()
    assert all(isinstance(block.mlp, MoEFeedForward) for block in network.blocks)
    if kind == "mmdit":  # the text stream's MLP is the same kind, but the context-pre-only last block has none
        assert all(isinstance(block.context_mlp, MoEFeedForward) for block in network.blocks[:-1])
        assert network.blocks[-1].context_mlp is None
    step = captioned_batch(seed=1)
    module.seed_training_draws(0)
    terms = module.training_losses(*module.unpack_batch(step))
    aux = pop_aux_losses(network)
    assert set(aux) == {"loss_balance"} and torch.isfinite(aux["loss_balance"]) and torch.isfinite(terms["loss"])
    module.seed_training_draws(0)
    loss = module.training_step(step, 0)  # the same draws: the diffusion loss plus the balance loss the MLPs left
    torch.testing.assert_close(loss, terms["loss"] + aux["loss_balance"], rtol=0, atol=1e-6)
    loss.backward()
    routers = [p for name, p in network.named_parameters() if name.endswith("mlp.router")]
    assert len(routers) == (2 * len(network.blocks) - 1 if kind == "mmdit" else len(network.blocks))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in routers)
