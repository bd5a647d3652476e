"""Label drop-out while training a router: L2C's 10% (horseee/learning-to-cache d6cc781, ``router_training_losses``:
one mask per sample shared by the full step and both calls of the pair), HarmoniCa's none (ModelTC/HarmoniCa
5d7f78d: its DiT trains in eval mode), 0 drawing nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.sampling.cache_router import CacheRouterModule, RouterConfig
from ditlab.methods.teacher import TeacherConfig
from ditlab.models.loading import network_checkpoint

CONFIGS = Path(__file__).resolve().parents[4] / "configs"
NULL = 10  # the tiny teacher's 10 classes: row 10 is the null class


def make_module(teacher_file: Path, **router) -> CacheRouterModule:
    module = CacheRouterModule(teacher=TeacherConfig(checkpoint=str(teacher_file)), router=RouterConfig(**router),
                               sampling=SamplingConfig(sampler="ddim", steps=4, cfg_scale=2.0))  # fmt: skip
    module.configure_model()
    return module


def test_each_mode_defaults_to_its_reference_and_the_recipes_say_so():
    assert RouterConfig(mode="l2c").label_dropout_rate == 0.1
    assert RouterConfig(mode="harmonica").label_dropout_rate == 0.0
    assert RouterConfig(mode="harmonica", label_dropout=0.25).label_dropout_rate == 0.25
    for name, rate in (("l2c.yaml", 0.1), ("harmonica.yaml", 0.0)):
        router = yaml.safe_load((CONFIGS / name).read_text())["model"]["init_args"]["router"]
        assert router["label_dropout"] == rate


def test_labels_are_dropped_at_the_rate_with_a_fixed_generator(teacher_file):
    module = make_module(teacher_file, mode="l2c")
    labels = torch.arange(20_000) % NULL
    dropped = module.drop_labels(labels, torch.Generator().manual_seed(5))
    expected = torch.rand(len(labels), generator=torch.Generator().manual_seed(5)) < 0.1
    assert torch.equal(dropped == NULL, expected)  # one uniform draw per sample, below the rate
    assert torch.equal(dropped[~expected], labels[~expected])
    assert float((dropped == NULL).float().mean()) == pytest.approx(0.1, abs=0.01)  # binomial sd 0.002
    again = module.drop_labels(labels, torch.Generator().manual_seed(5))
    assert torch.equal(again, dropped)


def test_zero_disables_it_and_draws_nothing(teacher_file):
    module = make_module(teacher_file, mode="l2c", label_dropout=0.0)
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    labels = torch.arange(1000) % NULL
    assert torch.equal(module.drop_labels(labels, generator), labels)
    assert torch.equal(generator.get_state(), state)  # the training draws are where they were before the option


def test_process_count_does_not_change_which_labels_drop(teacher_file):
    module = make_module(teacher_file, mode="l2c", label_dropout=0.5)
    labels = torch.arange(8)
    one = module.drop_labels(labels, torch.Generator().manual_seed(3))
    two = [module.drop_labels(labels[rank::2], torch.Generator().manual_seed(3), rank, 2) for rank in (0, 1)]
    assert torch.equal(torch.stack(two, 1).flatten(), one)


def test_an_l2c_pair_runs_on_the_dropped_labels(teacher_file, monkeypatch):
    """The one trajectory of a pair (its full step and both calls) carries the dropped labels."""
    module = make_module(teacher_file, mode="l2c", label_dropout=0.5)
    seen = []
    build = module.new_trajectory
    monkeypatch.setattr(module, "new_trajectory", lambda noise, labels: seen.append(labels) or build(noise, labels))
    labels = torch.arange(10)
    module.seed_training_draws(11)
    module.pair_terms(torch.randn(10, 1, 8, 8), labels)
    generator = torch.Generator().manual_seed(11)
    torch.randint(2, (1,), generator=generator)  # the cached call's pick comes first
    expected = torch.where(torch.rand(10, generator=generator) < 0.5, NULL, labels)
    assert len(seen) == 1 and torch.equal(seen[0], expected)
    assert 0 < int((expected == NULL).sum()) < 10


def test_harmonica_drops_nothing_by_default(teacher_file):
    module = make_module(teacher_file, mode="harmonica")
    module.seed_training_draws(0)
    module.rollout_terms(64)
    assert not (module.rollout.labels == NULL).any()
    module = make_module(teacher_file, mode="harmonica", label_dropout=0.5)
    module.seed_training_draws(0)
    module.rollout_terms(64)
    assert (module.rollout.labels == NULL).any()


def test_a_teacher_without_a_null_class_is_refused_in_one_line(tmp_path, tiny_dit):
    teacher = tmp_path / "teacher.ckpt"
    torch.save(network_checkpoint(tiny_dit(depth=2, learn_sigma=True, class_dropout_prob=0.0), ObjectiveConfig(),
                                  SamplingConfig(sampler="ddim", steps=4)), teacher)  # fmt: skip
    module = CacheRouterModule(teacher=TeacherConfig(checkpoint=str(teacher)), router=RouterConfig(mode="l2c"),
                               sampling=SamplingConfig(sampler="ddim", steps=4))  # fmt: skip
    with pytest.raises(ValueError, match="set model.router.label_dropout 0"):
        module.configure_model()
    make = CacheRouterModule(teacher=TeacherConfig(checkpoint=str(teacher)),
                             router=RouterConfig(mode="l2c", label_dropout=0.0),
                             sampling=SamplingConfig(sampler="ddim", steps=4))  # fmt: skip
    make.configure_model()


def test_a_rate_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="label_dropout=1.5 must be in"):
        CacheRouterModule(router=RouterConfig(mode="l2c", label_dropout=1.5))
