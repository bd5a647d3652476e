"""``FeedbackModule``: train Inner Loop Feedback's block on a frozen DiT by distillation (Gwilliam et al., arXiv
2501.13107; no public code, the wiring is our reading, see ``predictor.py``).

Training follows sampling trajectories from noise (no images), the way the feedback block is used: full calls run
the frozen network and keep the source block's output; at each feedback call the student (the frozen blocks after
the re-entry point on the feedback block's prediction) and the teacher (the full frozen network) see the same
sample, and the loss is ``output_weight * MSE(student, teacher) + feature_weight * MSE(h_hat, h)``, ``h`` the
teacher's source-block output at this call. One feedback call is trained per training step; the trajectory moves
on with the student's prediction (``rollout: student``, as it will at inference) or the teacher's [interp: the
paper does not say which]. Only the feedback block and its scale are trained and saved. Training steps through the
sampler's trajectory (``ditlab.diffusion.trajectory``), so any time grid, SDE and guidance interval works; when a
guidance interval changes the rows of a call, the kept features no longer fit and that call runs in full, as it does
at sampling (``FeedbackPolicy``).

A text-conditioned teacher (PixArt, MM-DiT; ILF was measured on PixArt and FLUX) is rolled out on the captions of
random digit-scene training scenes encoded by its frozen text encoder, guided against the empty caption
(``ditlab.methods.sampling.conditions``). The feedback block is a copy of the teacher's source block of whatever kind
(an MM-DiT block predicts both streams of ``[text; image]``, the feature loss covering both).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from ditlab.checkpoint import Bundle, network_bundle, through_teacher
from ditlab.diffusion.cache import as_cache_config
from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.diffusion.global_batch import draw_rows
from ditlab.diffusion.sample import null_label_of
from ditlab.diffusion.trajectory import Trajectory, trajectory_options
from ditlab.distributed import data_parallel_split
from ditlab.methods.base import DiffusionModule
from ditlab.methods.sampling.conditions import (
    draw_conditions,
    encode_conditions,
    loaded_conditions,
    saved_conditions,
)
from ditlab.methods.sampling.feedback.predictor import FeedbackBlock, FeedbackPolicy, check_wiring
from ditlab.methods.sampling.schedule import check_schedule, check_teacher_sampler, schedule_times
from ditlab.methods.teacher import FromTeacher, TeacherConfig
from ditlab.models.dit import DiT
from ditlab.models.taps import run_block_range, run_blocks


@dataclass
class FeedbackConfig:
    """The feedback block, where it sits, when it runs and what it learns from.

    Args:
        source: 0-based index of the block whose output is fed back (and copied into the feedback block).
        reentry: first block run on the prediction; None: ``source + 1``.
        interval: a full call every this many calls (after ``warmup``); feedback calls in between.
        warmup: calls at the start that are always full.
        gamma: the scale's initial value (ILF: 0).
        init: ``copy`` the source block into the feedback block, or ``random``.
        output_weight: weight of the output distillation loss.
        feature_weight: weight of the feature loss ``MSE(h_hat, h)``.
        rollout: which prediction moves the training trajectory: ``student`` or ``teacher``.
        train_cfg_scale: guidance while training; None uses ``sampling.cfg_scale``.
    """

    source: int = 5
    reentry: int | None = None
    interval: int = 2
    warmup: int = 0
    gamma: float = 0.0
    init: Literal["copy", "random"] = "copy"
    output_weight: float = 1.0
    feature_weight: float = 1.0
    rollout: Literal["student", "teacher"] = "student"
    train_cfg_scale: float | None = None


class FeedbackModule(FromTeacher, DiffusionModule):
    """Trains ILF's feedback block on a frozen teacher; see ``FeedbackConfig`` and the module notes.

    Args:
        teacher: the frozen backbone (a ditlab run, a public DiT file, a diffusers folder, or a cached recipe).
        feedback: the feedback block's wiring, schedule and losses.
        objective: used only for teachers that do not record one.
        sampling: the sampler, steps and guidance it is trained for; None takes the teacher's.
        lr, weight_decay, betas, warmup_steps: AdamW and its linear warm-up.
    """

    builds_own_network = True

    def __init__(
        self,
        teacher: TeacherConfig = TeacherConfig(),
        feedback: FeedbackConfig = FeedbackConfig(),
        objective: ObjectiveConfig = ObjectiveConfig(),
        sampling: SamplingConfig | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
    ) -> None:
        if feedback.interval < 2:
            raise ValueError(f"model.feedback.interval={feedback.interval}: at least 2 (one full call, then feedback)")
        super().__init__(objective=objective, sampling=sampling or SamplingConfig(), lr=lr, weight_decay=weight_decay,
                         betas=betas, warmup_steps=warmup_steps, ema_decay=None)  # fmt: skip
        self.automatic_optimization = False
        self.teacher_config, self.feedback_config = teacher, feedback
        self.hold_teacher(sampling is not None)
        self.feedback: FeedbackBlock | None = None
        self.trajectory: Trajectory | None = None
        """The training trajectory in progress (this process's rows)."""
        self.hidden: torch.Tensor | None = None
        """The source block's output at its last call (a full call's, or the last prediction)."""
        self.trajectory_labels = None
        """The trajectory's conditions as drawn (labels, or captions before encoding: what a checkpoint stores)."""

    @property
    def sampler(self) -> str:
        return self.sampling.sampler or self.objective.default_sampler

    @property
    def reentry(self) -> int:
        config = self.feedback_config
        return config.source + 1 if config.reentry is None else config.reentry

    def configure_model(self) -> None:
        if self.feedback is not None:
            return
        teacher, config = self.teacher, self.feedback_config
        self.objective = self.objective_config.build(teacher.learn_sigma)
        given = self.teacher_config
        check_teacher_sampler(self.objective, self.sampling.sampler, given.checkpoint or f"built from {given.recipe}")
        check_wiring(config.source, config.reentry, teacher.depth)
        self.feedback = FeedbackBlock(teacher.blocks[config.source], config.gamma, config.init).to(self.device)

    def schedule(self) -> torch.Tensor:
        return schedule_times(self.objective, **trajectory_options(self.sampling))

    def full_call(self, call: int) -> bool:
        config = self.feedback_config
        return call < config.warmup or (call - config.warmup) % config.interval == 0

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.feedback.parameters())

    @property
    def sampling_network(self) -> DiT:
        return self.teacher

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.feedback.parameters()) if self.feedback is not None else 0

    def model_function(self) -> FeedbackPolicy:
        """What to sample with: the teacher with this feedback block, planned for the trained schedule."""
        config = self.feedback_config
        return FeedbackPolicy(self.teacher, self.schedule(), self.feedback, source=config.source,
                              reentry=config.reentry, interval=config.interval, warmup=config.warmup)  # fmt: skip

    def schedule_entry(self) -> dict:
        """The schedule and wiring the block was trained for (saved in checkpoints; sampling checks it)."""
        config = self.feedback_config
        return {"sampler": self.sampler, "steps": self.sampling.steps, "times": self.schedule().tolist(),
                "source": config.source, "reentry": self.reentry, "interval": config.interval, "warmup": config.warmup}

    def sample(self, labels: torch.Tensor, seed: int = 0, start: int = 0, show_progress: bool = False,
               network: DiT | None = None, **overrides) -> torch.Tensor:  # fmt: skip
        """Images sampled by the teacher with the feedback block (the schedule it was trained for)."""
        factory = feedback_factory(self.feedback, self.schedule_entry())
        return super().sample(labels, seed, start, show_progress, network, factory=factory, **overrides)

    @classmethod
    def checkpoint_bundle(cls, checkpoint: dict, use_ema: bool = True) -> Bundle:
        """What ``ditlab sample --ckpt ILF.ckpt`` samples: the recorded teacher (or the one inside an export,
        ``feedback/export.py``) with the saved feedback block, on the schedule it was trained for (``use_ema``: the
        block has no EMA copy)."""
        saved = checkpoint["feedback"]
        weights = {key[len("feedback."):]: value for key, value in checkpoint["state_dict"].items()
                   if key.startswith("feedback.")}  # fmt: skip
        what = f"its feedback block (block {saved['source']} fed back, a full call every {saved['interval']})"
        if any(key.startswith("network.") for key in checkpoint["state_dict"]):  # an export: the teacher inside
            bundle = network_bundle(checkpoint)
            bundle = replace(bundle, source=f"the teacher inside the export through {what}")
        else:
            bundle = through_teacher(checkpoint, None, what)
        block = FeedbackBlock(bundle.network.blocks[saved["source"]])
        block.load_state_dict(weights)
        return replace(bundle, factory=feedback_factory(block.requires_grad_(False).eval(), saved))

    def new_trajectory(self, noise: torch.Tensor, labels) -> Trajectory:
        """A trajectory of the schedule and guidance the block trains for, from ``noise`` (``train_cfg_scale``), for
        ``labels`` (class labels, captions, encoded here by the teacher's text encoder, or ``TextFeatures``)."""
        scale = self.feedback_config.train_cfg_scale
        scale = self.sampling.cfg_scale if scale is None else scale
        teacher = self.teacher
        return Trajectory(self.objective, noise, encode_conditions(teacher, labels, self.device),
                          null_label=null_label_of(teacher), **trajectory_options(self.sampling, cfg_scale=scale))  # fmt: skip

    # ----------------------------------------------------------------------------------- training
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        terms = self.feedback_terms(len(batch[0]))
        optimizer, schedule = self.optimizers(), self.lr_schedulers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(terms["loss"])
        optimizer.step()
        schedule.step()
        values = {f"train/{name}": value.detach() for name, value in terms.items()}
        values["train/gamma"] = self.feedback.gamma.detach()
        self.log_dict(values, on_step=True, on_epoch=False, batch_size=len(batch[0]), sync_dist=True)
        return terms["loss"].detach()

    def feedback_terms(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Run full calls until the next feedback call (opening a trajectory if needed) and distil at it."""
        while True:
            if self.trajectory is None or self.trajectory.done:
                self.start_trajectory(batch_size)
            trajectory = self.trajectory
            inputs = trajectory.inputs()
            fits = self.hidden is not None and len(self.hidden) == len(inputs[0])  # guidance rows may have changed
            if not self.full_call(trajectory.index) and fits:
                break
            self.full_step(trajectory, inputs)
        with torch.no_grad():
            tapped = run_blocks(self.teacher, *inputs, hidden=[self.feedback_config.source])
        _, cond = self.teacher.embed(*inputs)
        predicted = self.feedback(self.hidden, cond)
        student = self.teacher.head(run_block_range(self.teacher, predicted, cond, range(self.reentry, self.teacher.depth)),
                                    cond)  # fmt: skip
        output = F.mse_loss(student, tapped.output)
        feature = F.mse_loss(predicted, tapped.hidden[self.feedback_config.source])
        config = self.feedback_config
        loss = config.output_weight * output + config.feature_weight * feature
        trajectory.step((student if config.rollout == "student" else tapped.output).detach())
        self.hidden = predicted.detach()
        return {"loss": loss, "output_mse": output.detach(), "feature_mse": feature.detach()}

    @torch.no_grad()
    def start_trajectory(self, batch_size: int) -> None:
        teacher, generator = self.teacher, self.training_generator(self.device)
        rank, world_size = data_parallel_split(self._trainer)
        shape = (teacher.in_channels, teacher.input_size, teacher.input_size)
        noise = draw_rows(lambda n: torch.randn(n, *shape, device=self.device, generator=generator), batch_size, rank,
                          world_size)  # fmt: skip
        labels = draw_conditions(teacher, generator, batch_size, self.device, rank, world_size)
        self.trajectory, self.hidden = self.new_trajectory(noise, labels), None
        self.trajectory_labels = labels

    @torch.no_grad()
    def full_step(self, trajectory: Trajectory, inputs: tuple[torch.Tensor, ...]) -> None:
        """The full network at this call (its ``inputs``): keeps the source block's output and moves the sample."""
        tapped = run_blocks(self.teacher, *inputs, hidden=[self.feedback_config.source])
        self.hidden = tapped.hidden[self.feedback_config.source]
        trajectory.step(tapped.output)

    def validation_step(self, batch, batch_idx: int) -> None:
        """Nothing to validate on data: the feedback block is judged by sampling (``bench/learned_caching.py``)."""

    # ----------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trajectory = self.trajectory
        state = None
        if trajectory is not None and not trajectory.done:
            state = {"x": trajectory.x, "labels": saved_conditions(self.trajectory_labels), "hidden": self.hidden,
                     "index": trajectory.index}  # fmt: skip
        checkpoint["ditlab"] = self.sampled_entry()
        checkpoint["feedback"] = {**self.schedule_entry(), "trajectory": state,
                                  "training_draws": self._draws.get_state() if self._draws is not None else None}  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("feedback")
        if saved is None:
            raise ValueError("this checkpoint holds no feedback block (no 'feedback' entry); resume a FeedbackModule run")
        check_schedule(saved, self.sampler, self.sampling.steps, self.schedule().tolist(), what="this feedback block")
        self._draws, self._pending_draws = None, saved["training_draws"]
        self.trajectory, self.hidden = None, None
        if saved["trajectory"] is not None:
            state = saved["trajectory"]
            x, labels = state["x"].to(self.device), loaded_conditions(state["labels"], self.device)
            self.trajectory, self.trajectory_labels = self.new_trajectory(x, labels), labels
            self.trajectory.x, self.trajectory.index = x, state["index"]
            self.hidden = state["hidden"].to(self.device) if state["hidden"] is not None else None


def feedback_factory(block: FeedbackBlock, saved: dict):
    """``factory(network, objective, **sampling options) -> FeedbackPolicy``: the network with ``block`` wired as
    ``saved`` records (source, re-entry, interval, warm-up); another schedule or a feature cache on top is refused."""

    def with_feedback(network: DiT, objective, cache=None, **options) -> FeedbackPolicy:
        policy = as_cache_config(cache).policy
        if policy != "none":
            raise ValueError(f"an ILF run samples through its feedback block; --cache {policy} does not apply (sample "
                             "its teacher's checkpoint to try another cache)")  # fmt: skip
        times = schedule_times(objective, **options)
        sampler = options.get("sampler") or objective.default_sampler
        check_schedule(saved, sampler, options.get("steps"), times.tolist(), what="this feedback block")
        return FeedbackPolicy(network, times, block, source=saved["source"], reentry=saved["reentry"],
                              interval=saved["interval"], warmup=saved["warmup"])  # fmt: skip

    return with_feedback
