"""PPCL as PPCL: segments are the plan's intervals, middle-block init, plugs, and the interval choice."""

from __future__ import annotations

import pytest
import torch

from ditlab.data.digits import digits_tensors
from ditlab.diffusion import GaussianDiffusion
from ditlab.methods.compress.analysis import select_blocks
from ditlab.methods.compress.distill import layer_losses
from ditlab.methods.compress.ppcl import Plug, plan_segments, plugged, plugs, replaced_blocks
from ditlab.methods.compress.probes import IntervalPlan, choose_intervals
from ditlab.methods.compress.prune import prune_depth
from ditlab.models.dit import DiT


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits_tensors(image_size=8)
    return images[:64], labels[:64]


@pytest.fixture
def teacher(tiny_dit) -> DiT:
    return tiny_dit(depth=8, std=0.2).eval().requires_grad_(False)


def interval(start: int, end: int, keep: int | None) -> dict:
    return {"start": start, "end": end, "keep": keep, "span": end - start + 1, "cka": 1.0, "score": 1.0, "knee": 4}


def test_plan_segments_are_the_intervals_and_gaps_belong_to_no_block():
    plan = IntervalPlan([interval(1, 3, 2), interval(5, 6, 5)], singles=[7], knees=[], threshold=0.0)
    segments, keep = plan_segments(plan, 8)
    assert segments == [(0, 0), (1, 3), (4, 4), (5, 6)]
    assert keep == [0, 2, 4, 5]
    assert [segments[i] for i in replaced_blocks(segments)] == [(1, 3), (5, 6)]
    assert plugs(segments, 8) == [Plug(1, 3, 1), Plug(5, 6, 3), Plug(7, 7, None)]


def test_selected_segments_equal_the_plan_intervals_and_keep_the_middle_block(teacher, digits):
    selection = select_blocks(teacher, GaussianDiffusion(), *digits, "ppcl", 4, tau=1e9)  # no knee: any span
    intervals = [(i["start"], i["end"]) for i in selection.table["intervals"] if i["keep"] is not None]
    assert intervals, "a 4-of-8 plan with no knee has intervals"
    replaced = [selection.segments[i] for i in replaced_blocks(selection.segments)]
    assert replaced == [span for span in intervals if span[1] > span[0]]
    for kept, (first, last) in zip(selection.keep, selection.segments):
        assert kept == (first + last) // 2
    removed = set(range(8)) - {b for first, last in selection.segments for b in range(first, last + 1)}
    assert removed == set(selection.table["dropped_singles"])
    assert len(selection.keep) == 4


def test_middle_block_init_copies_the_block_the_plan_names(teacher, digits):
    selection = select_blocks(teacher, GaussianDiffusion(), *digits, "ppcl", 4, tau=1e9)
    student = prune_depth(teacher, selection.keep, spans=selection.segments)
    for index, kept in enumerate(selection.keep):
        for key, value in student.blocks[index].state_dict().items():
            assert torch.equal(value, teacher.blocks[kept].state_dict()[key])


def test_every_plug_off_is_the_teacher_and_every_subset_runs(teacher, dit_inputs, perturb):
    segments = [(0, 0), (1, 3), (4, 4), (5, 6)]  # block 7 removed: a plug with no replacement
    student = prune_depth(teacher, [0, 2, 4, 5], spans=segments)
    for index in replaced_blocks(segments):  # "trained" replacements; everything else stays the teacher's
        perturb(student.blocks[index], seed=index)
    x, t, y = dit_inputs(teacher)
    with torch.no_grad():
        expected = teacher(x, t, y)
        assert torch.equal(plugged(teacher, student, segments, [False, False, False])(x, t, y), expected)
        assert torch.equal(plugged(teacher, student, segments)(x, t, y), student(x, t, y))
        depths = []
        for mask in ([True, False, False], [False, True, False], [False, False, True], [True, True, False]):
            network = plugged(teacher, student, segments, mask)
            assert torch.isfinite(network(x, t, y)).all()
            depths.append(network.depth)
        assert depths == [6, 7, 7, 5]  # an interval on saves its span - 1 blocks, the removed block 1
    with pytest.raises(ValueError, match="3 plugs"):
        plugged(teacher, student, segments, [True])


def test_teacher_forced_interval_loss_is_local_to_its_replacement(teacher, dit_inputs, perturb):
    segments = [(0, 0), (1, 3), (4, 4), (5, 6), (7, 7)]
    keep = [0, 2, 4, 5, 7]
    student = prune_depth(teacher, keep, spans=segments)
    x, t, y = dit_inputs(teacher)
    before, _ = layer_losses(student, teacher, x, t, y, keep, feature_kind="direction", teacher_forced=True,
                             spans=segments)  # fmt: skip
    assert before[0] == 0 and before[2] == 0 and before[4] == 0 and before[1] > 0
    perturb(student.blocks[1], seed=3)
    after, _ = layer_losses(student, teacher, x, t, y, keep, feature_kind="direction", teacher_forced=True,
                            spans=segments)  # fmt: skip
    assert torch.equal(after[3], before[3]) and not torch.equal(after[1], before[1])


def test_absorb_joins_fallback_runs_to_neighbouring_intervals():
    # spans 1..3 score 1 - 0.01 k at starts 4..5 only; everything else drops steeply after one block
    depth = 10
    scores = torch.full((depth, 3), float("nan"), dtype=torch.float64)
    for start in range(depth):
        for k in range(1, min(3, depth - start) + 1):
            scores[start, k - 1] = 1 - 0.01 * k if start in (4, 5) else 1 - 0.5 * (k - 1) - 0.001
    importance = torch.ones(depth)
    importance[3] = 0.0  # the fallback drops block 3 first, right before the interval
    plain = choose_intervals(scores, 4, importance, tau=0.1, tau_unit="absolute", order="cost")
    merged = choose_intervals(scores, 4, importance, tau=0.1, tau_unit="absolute", order="cost", absorb=True)
    assert 3 in plain.singles and 3 not in merged.singles
    chosen = next(i for i in merged.intervals if 3 in i.get("absorbed", []))
    assert chosen["start"] == 3 and chosen["keep"] == (chosen["start"] + chosen["end"]) // 2
    removed = sum(i["span"] - 1 for i in merged.intervals if i["keep"] is not None) + len(merged.singles)
    assert removed == 4
