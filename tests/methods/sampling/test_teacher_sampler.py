"""A sampling-time method configured for one objective's sampler, given a teacher of the other: the teacher is named."""

from __future__ import annotations

import pytest
import torch

from ditlab.diffusion.config import ObjectiveConfig, SamplingConfig
from ditlab.methods.sampling.cache_router import CacheRouterModule
from ditlab.methods.sampling.feedback import FeedbackConfig, FeedbackModule
from ditlab.methods.teacher import TeacherConfig
from ditlab.models.loading import network_checkpoint


@pytest.mark.parametrize("module", [CacheRouterModule, FeedbackModule])
def test_a_flow_teacher_for_a_ddim_run_is_named_as_the_mismatch(module, tmp_path, tiny_dit):
    teacher = tmp_path / "sit.ckpt"
    torch.save(network_checkpoint(tiny_dit(depth=4), ObjectiveConfig(kind="flow"), SamplingConfig(sampler="euler")),
               teacher)  # fmt: skip
    extra = {"feedback": FeedbackConfig(source=1)} if module is FeedbackModule else {}
    run = module(TeacherConfig(checkpoint=str(teacher)), sampling=SamplingConfig(sampler="ddim", steps=4), **extra)
    with pytest.raises(ValueError, match=rf"the teacher {teacher} is a flow \(SiT\) model, and the run's sampler 'ddim' "
                                         r"\(model.init_args.sampling.sampler\) is for a DDPM \(DiT\) one"):  # fmt: skip
        run.configure_model()
