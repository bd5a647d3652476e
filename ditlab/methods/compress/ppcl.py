"""PPCL's pluggable student: one replacement block per redundant interval, switchable in or out.

PPCL ("Pluggable Pruning with Contiguous Layer Distillation for Diffusion Transformers", Ma et al., CVPR 2026,
arXiv 2511.16156; code OPPO-Mente-Lab/Qwen-Image-Pruning) replaces each contiguous interval ``[s, e]`` of
redundant teacher blocks by one student block, a copy of the middle block ``floor((s + e) / 2)``, trained
teacher-forced (input ``h_s``, target ``h_{e+1}``, direction loss) with everything else frozen. Because every
replacement learns alone against the teacher, any subset can be switched on at inference ("plugs"), which
gives several compression ratios from one training.

Here a student is described by its *segments*: ``segments[i] = (first, last)`` are the teacher blocks student
block ``i`` stands for. PPCL's segments are the plan's intervals plus one ``(b, b)`` per untouched block;
teacher blocks in no segment (the plan's fallback drops) are removed outright. A *plug* is a run of teacher
blocks that the student does not reproduce one to one: an interval (switched on, its replacement block runs)
or a removed run (switched on, nothing runs). With every plug off, :func:`plugged` rebuilds the teacher.

On MM-DiT stacks (PPCL's own setting: Qwen-Image, FLUX.1, SD3.5) every block carries ``[text; image]``, so an
interval's probe and its replacement cover both streams; on FLUX an interval may span double- and single-stream
blocks (its replacement is a copy of its middle block, whichever kind that is, and the rebuilt network counts its
double-stream blocks again). A plug mask that would put SD3's context-pre-only block (the student's last) before
teacher blocks is refused in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ditlab.methods.compress.probes import IntervalPlan
from ditlab.methods.compress.prune import _block_state, _rebuild, _student_state, stack_config
from ditlab.models.dit import DiT


def plan_segments(plan: IntervalPlan, depth: int) -> tuple[list[tuple[int, int]], list[int]]:
    """A PPCL plan as ``(segments, keep)``: one segment per student block, in order, and the teacher block
    each starts from (the interval's representative, else the block itself). Bypassed intervals (``keep`` None)
    and the plan's dropped single blocks belong to no segment."""
    starts = {interval["start"]: interval for interval in plan.intervals if interval["keep"] is not None}
    removed = set(plan.singles)
    removed |= {b for i in plan.intervals if i["keep"] is None for b in range(i["start"], i["end"] + 1)}
    segments, keep, block = [], [], 0
    while block < depth:
        if block in starts:
            interval = starts[block]
            segments.append((interval["start"], interval["end"]))
            keep.append(interval["keep"])
            block = interval["end"] + 1
        else:
            if block not in removed:
                segments.append((block, block))
                keep.append(block)
            block += 1
    return segments, keep


@dataclass(frozen=True)
class Plug:
    """Teacher blocks ``start..end`` (inclusive) that student block ``student`` replaces (None: removed)."""

    start: int
    end: int
    student: int | None


def replaced_blocks(segments: Sequence[tuple[int, int]]) -> list[int]:
    """Student blocks that stand for more than one teacher block (PPCL's replacement blocks)."""
    return [index for index, (first, last) in enumerate(segments) if last > first]


def plugs(segments: Sequence[tuple[int, int]], depth: int) -> list[Plug]:
    """Every switchable edit of a student with these segments over a ``depth``-block teacher, in depth order."""
    covered = {b for first, last in segments for b in range(first, last + 1)}
    if len(covered) != sum(last - first + 1 for first, last in segments) or not covered <= set(range(depth)):
        raise ValueError(f"segments {list(segments)} overlap or leave 0..{depth - 1}; give disjoint (first, last) runs")
    result = [Plug(first, last, index) for index, (first, last) in enumerate(segments) if last > first]
    gap: list[int] = []
    for block in range(depth + 1):
        if block < depth and block not in covered:
            gap.append(block)
        elif gap:
            result.append(Plug(gap[0], gap[-1], None))
            gap = []
    return sorted(result, key=lambda plug: plug.start)


def plugged(teacher: DiT, student: DiT, segments: Sequence[tuple[int, int]], mask: Sequence[bool] | None = None) -> DiT:
    """A plain DiT: ``student`` with plug ``j`` (see :func:`plugs`) switched on where ``mask[j]``, else the
    teacher's blocks in its place. Embedders, head and one-to-one blocks come from ``student``, so with every
    plug off a student whose only trained weights are its replacements *is* the teacher. ``mask`` None: all on.
    """
    if student.depth != len(segments):
        raise ValueError(f"student has {student.depth} blocks but {len(segments)} segments; pass the student's segments")
    edits = plugs(segments, teacher.depth)
    mask = [True] * len(edits) if mask is None else [bool(m) for m in mask]
    if len(mask) != len(edits):
        raise ValueError(f"mask has {len(mask)} entries but the student has {len(edits)} plugs {edits}")
    by_start = {plug.start: (plug, on) for plug, on in zip(edits, mask)}
    owner = {first: index for index, (first, last) in enumerate(segments) if first == last}
    sources: list[tuple[DiT, int]] = []  # (network, block) filling each position
    block = 0
    while block < teacher.depth:
        if block in by_start:
            plug, on = by_start[block]
            if on and plug.student is not None:
                sources.append((student, plug.student))
            elif not on:
                sources.extend((teacher, b) for b in range(plug.start, plug.end + 1))
            block = plug.end + 1
        else:
            sources.append((student, owner[block]))
            block += 1
    if not sources:
        raise ValueError("this plug mask removes every block; switch at least one plug off")
    config = stack_config(student, [network.blocks[index] for network, index in sources])
    blocks = [_block_state(network, index) for network, index in sources]
    return _rebuild(student, config, _student_state(student, blocks))
