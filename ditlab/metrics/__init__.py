"""Sample-quality metrics: FID, IS, precision/recall and CLIP score on a named feature network.

``evaluate_images(images)`` is the one-call entry; ``ditlab.callbacks.evaluation.Evaluation`` runs it
during training and ``ditlab eval`` from a checkpoint.
"""

from ditlab.metrics.features import FeatureExtractor, digits_classifier, feature_extractor, inception_v3
from ditlab.metrics.fid import (
    evaluate_images,
    fid_from_features,
    frechet_distance,
    inception_score,
    precision_recall,
)

__all__ = [
    "FeatureExtractor",
    "digits_classifier",
    "evaluate_images",
    "feature_extractor",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "inception_v3",
    "precision_recall",
]
