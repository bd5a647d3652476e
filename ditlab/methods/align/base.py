"""``AlignmentBase``: what REPA, HASTE and Self-Transcendence share on top of ``DiffusionModule``.

- trainable heads (projectors) in ``self.heads``: saved in checkpoints, optimised with the network, never
  in the EMA or in exported networks (``ditlab convert`` / ``sample`` read ``network.``/``ema.`` only);
- a frozen *target network* (an encoder, or the phase-1 teacher) in a ``FrozenNetwork`` holder, so it is never
  in ``state_dict``, the optimiser or DDP's parameter list; loaded on first use, or at fit start;
- the encoder's input: in pixel space the training batch itself; on VAE latents the clean images that
  ``LatentDataModule(pixels=True)`` returns as a third batch element (:meth:`encoder_pixels`), as the papers
  feed DINOv2 the image whose latents are denoised;
- stage-wise termination (HASTE): :meth:`terminate_alignment` switches every alignment term off for
  good, drops the target network and records the step, which checkpoints carry, so a resumed run past
  the step never loads the target again. ``ditlab.callbacks.alignment.AlignmentTermination`` calls it.
"""

from __future__ import annotations

import torch
from torch import nn

from ditlab.methods.base import DiffusionModule
from ditlab.methods.frozen import FrozenNetwork


class AlignmentBase(DiffusionModule):
    """A ``DiffusionModule`` with alignment heads, a frozen target network and a termination switch.

    Subclasses implement :meth:`alignment_losses` (the loss terms while alignment is on) and, when they use
    one, :meth:`load_target`. Every alignment term is named ``loss_align_<kind>``; ``loss_align`` is their
    weighted sum, ``loss`` the diffusion loss plus ``loss_align``.
    """

    method = "align"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.heads = nn.ModuleDict()
        self._target = FrozenNetwork(self.load_target)
        self.terminated_at: int | None = None
        """The step alignment stopped at (None while it is on): the one record of termination, checkpointed
        with the module; ``AlignmentTermination`` only decides when to call :meth:`terminate_alignment`."""
        self.last_terms: dict[str, torch.Tensor] = {}
        """The detached loss terms of the last training step."""
        self._pixels: torch.Tensor | None = None  # this step's clean images when training on latents
        self.summary["alignment"] = {"method": self.method, "terminated_at": None}

    # ----------------------------------------------------------------------------------- target network
    uses_target = True
    """False where the method has no frozen network to align to (Self-Transcendence phase 1)."""
    terminable = True
    """False where the method's alignment has no stop step (Self-Transcendence phase 1); the callback skips it."""

    def load_target(self) -> nn.Module:
        """Build the frozen target network (encoder or teacher); called at most once before termination."""
        raise NotImplementedError

    @property
    def alignment_active(self) -> bool:
        return self.terminated_at is None

    @property
    def target_loaded(self) -> bool:
        return self._target.loaded

    @property
    def target_loads(self) -> int:
        """How many times the target network was loaded in this process (tests: never after termination)."""
        return self._target.loads

    @property
    def target_network(self) -> nn.Module | None:
        """The frozen target on this module's device; None once alignment has terminated (never reloaded)."""
        if not self.alignment_active or not self.uses_target:
            return None
        return self._target.get(self.device)

    def on_fit_start(self) -> None:
        """Load the target before the first step (errors surface early; step 0's time stays a step's time)."""
        super().on_fit_start()
        if self.alignment_active and self.uses_target:
            self.target_network  # noqa: B018 - loads it

    def terminate_alignment(self, step: int) -> int:
        """Alignment off from ``step`` on: the target network is dropped and collected; returns its bytes."""
        if not self.alignment_active:
            return 0
        released = self._target.release()
        self.terminated_at = int(step)
        self._forget_logged_alignment_terms()
        self.summary["alignment"].update(terminated_at=self.terminated_at, released_bytes=released)
        return released

    def _forget_logged_alignment_terms(self) -> None:
        """Lightning re-sends an on-step value every step until the epoch ends, even once it is no longer
        logged; reset our ``loss_align*`` entries so TensorBoard shows no alignment term after termination."""
        if self._trainer is None:
            return
        for key, metric in (getattr(self._trainer, "_results", None) or {}).items():
            if "/loss_align" in key:
                metric.reset()
        final = self._trainer.callback_metrics  # summary.json's final metrics: no stale alignment terms
        for key in [key for key in final if "/loss_align" in key]:
            final.pop(key)

    # ----------------------------------------------------------------------------------- training
    def alignment_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms while alignment is on (diffusion terms, ``loss_align_*``, ``loss_align``, ``loss``)."""
        raise NotImplementedError

    def training_losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Alignment terms until termination; afterwards exactly ``DiffusionModule``'s diffusion loss.

        After termination the heads are not run. Under DDP (static graph, no unused-parameter search) a
        zero-weighted sum of the head parameters keeps every parameter in the graph; the loss value is
        unchanged, bit for bit.
        """
        if self.alignment_active:
            terms = self.alignment_losses(images, labels)
        else:
            terms = super().training_losses(images, labels)
            trainer = self._trainer
            if trainer is not None and trainer.world_size > 1 and len(self.heads):
                terms["loss"] = terms["loss"] + 0.0 * sum(p.sum() for p in self.heads.parameters())
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        return terms

    def encoder_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """What the encoder sees for this batch: the clean images that came with latents, else the batch itself.

        A latent-space run (``model.init_args.vae`` set) without pixels in its batches is refused in one line.
        """
        if self._pixels is not None:
            return self._pixels
        if self.vae_path is not None:
            raise ValueError("this run trains on VAE latents but its batches carry no clean images for the encoder; "
                             "set data.init_args.pixels: true (LatentDataModule)")  # fmt: skip
        return images

    def split_batch(self, batch) -> tuple[tuple, torch.Tensor | None]:
        """``(the batch as DiffusionModule reads it, clean pixels or None)``: a latent batch ``(latents, labels,
        images)`` hands its images to the encoder; a captioned batch ``(images, labels, captions)`` (a
        text-conditioned network) keeps its captions for the network and the images are the pixels."""
        images, labels, *extra = batch
        if self.text_conditioned:
            return tuple(batch), None
        return (images, labels), extra[0] if extra else None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        batch, self._pixels = self.split_batch(batch)
        try:
            loss = super().training_step(batch, batch_idx)
        finally:
            self._pixels = None
        self.log(
            "align/active",
            float(self.alignment_active),
            on_step=True,
            on_epoch=False,
            batch_size=len(batch[0]),
        )
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        super().validation_step(self.split_batch(batch)[0], batch_idx)  # clean images are not needed

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The network's and the heads' trainable parameters (the EMA and the target are frozen)."""
        return [*super().trainable_parameters(), *(p for p in self.heads.parameters() if p.requires_grad)]

    # ----------------------------------------------------------------------------------- checkpoints
    def alignment_state(self) -> dict:
        """What a checkpoint records about alignment (subclasses add their own keys)."""
        return {"method": self.method, "terminated_at": self.terminated_at}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["align"] = self.alignment_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore the termination state first, so a run resumed past the step never loads the target."""
        state = checkpoint.get("align")
        if state is None:
            raise ValueError("this checkpoint was not written by an alignment module; resume it with the module that "
                             "wrote it, or start from its weights with a fresh run")  # fmt: skip
        if state.get("method") != self.method:
            raise ValueError(f"this checkpoint was written by {state.get('method')!r} alignment but the config trains "
                             f"{self.method!r}; resume it with the config that wrote it")  # fmt: skip
        if state.get("terminated_at") is not None:
            self.terminated_at = int(state["terminated_at"])
            self._target.release()
            self.summary["alignment"].update(terminated_at=self.terminated_at)
        super().on_load_checkpoint(checkpoint)
