"""Inner Loop Feedback (ILF): a feedback block trained on a frozen DiT predicts a block's next-step features, so
feedback steps run only the blocks after it."""

from ditlab.methods.sampling.feedback.module import FeedbackConfig, FeedbackModule
from ditlab.methods.sampling.feedback.predictor import FeedbackBlock, FeedbackPolicy

__all__ = ["FeedbackBlock", "FeedbackConfig", "FeedbackModule", "FeedbackPolicy"]
