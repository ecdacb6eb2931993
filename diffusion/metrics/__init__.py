"""Sample-quality metrics and the feature extractors they run on.

Set distances (`distances.py`; arrays (N, ...), trailing dimensions flattened, any features):
  frechet_distance / feature_stats / frechet_distance_from_stats   Heusel et al. 2017
  kid / kid_subsets                                                 Binkowski et al. 2018
  precision_recall                                                  Kynkaanniemi et al. 2019
  sliced_wasserstein, gmm_metrics                                   raw samples, analytic GMMs
Feature extractors (each `load(path)` returns jitted functions of images):
  inception            FID's Inception-v3 (pytorch-fid weights): images in [0, 1] -> (N, 2048)
  digits_classifier    a small CNN trained here on the built-in digits: images in [-1, 1];
                       Frechet distance on its features is "FD in digits-classifier features",
                       never "FID"
  classifier           the generic conv classifier + safetensors save/load both build on
features.extract(fn, images, batch_size) runs any extractor in fixed-size batches (one compile).
"""

from diffusion.metrics import classifier, digits_classifier, features, inception
from diffusion.metrics.distances import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    gmm_metrics,
    kid,
    kid_subsets,
    precision_recall,
    sliced_wasserstein,
    subset_indices,
)

__all__ = [
    "classifier",
    "digits_classifier",
    "feature_stats",
    "features",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gmm_metrics",
    "inception",
    "kid",
    "kid_subsets",
    "precision_recall",
    "sliced_wasserstein",
    "subset_indices",
]
