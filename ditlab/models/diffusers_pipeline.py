"""``DitlabDiTPipeline``: the pipeline class of a ``ditlab convert --format diffusers`` folder (copied there as
``pipeline.py``, so ``DiffusionPipeline.from_pretrained(folder)`` loads it with diffusers alone; it imports no ditlab).

diffusers' ``DiTPipeline`` assumes ImageNet's DiT: the guidance null class is 1000 and a VAE decodes the latents.
A ditlab run may have other classes (digits: 10, null class 10) and may train in pixel space; this subclass takes
the null class from the transformer's config and, with no VAE (``vae: null``), returns the sampled tensor itself
(pixels in [-1, 1]), and it restores the run's timestep-embedding shift (``_ditlab`` in the transformer's config).
Otherwise it is ``DiTPipeline``'s loop: guidance on every channel, a learned variance dropped.
"""

from __future__ import annotations

import torch
from diffusers import DiTPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class DitlabDiTPipeline(DiTPipeline):
    """``DiTPipeline`` with the transformer's own null class and an optional VAE (none for a pixel-space run)."""

    _optional_components = ["vae"]

    def __init__(self, transformer, scheduler, vae=None, id2label: dict[int, str] | None = None) -> None:
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        exact = transformer.config.get("_ditlab") or {}
        for block in transformer.transformer_blocks if "freq_shift" in exact else []:  # not in diffusers' config
            block.norm1.emb.time_proj.downscale_freq_shift = exact["freq_shift"]

    @torch.no_grad()
    def __call__(self, class_labels: list[int], guidance_scale: float = 4.0,
                 generator: torch.Generator | list[torch.Generator] | None = None, num_inference_steps: int = 50,
                 output_type: str = "pil", return_dict: bool = True):  # fmt: skip
        """Images for ``class_labels``, as ``DiTPipeline.__call__`` (``output_type``: ``pil``, ``np`` or ``pt``,
        in [0, 1]); a list of generators, one an image, draws image ``i``'s noise from generator ``i``."""
        config, device = self.transformer.config, self._execution_device
        channels, size = config.in_channels, config.sample_size
        latents = randn_tensor((len(class_labels), channels, size, size), generator=generator, device=device,
                               dtype=self.transformer.dtype)  # fmt: skip
        labels = torch.tensor(class_labels, device=device).reshape(-1)
        guided = guidance_scale > 1
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, config.num_embeds_ada_norm)])
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
            timesteps = torch.as_tensor(t, device=device).reshape(1).expand(len(model_input))
            output = self.transformer(model_input, timestep=timesteps, class_labels=labels).sample[:, :channels]
            if guided:
                cond, uncond = output.chunk(2)
                output = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(output, t, latents).prev_sample
        images = latents if self.vae is None else self.vae.decode(latents / self.vae.config.scaling_factor).sample
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
