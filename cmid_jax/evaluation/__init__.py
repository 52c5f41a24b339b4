"""Evaluation of pretrained backbones on labelled scenes, segmentation masks and change pairs.

`protocols` (the registry of the protocols: `knn`, `linear`, `finetune`, `segmentation`,
`change`, each with its options, its run and its online form), `labelled` (seeded per-class
split), `features` (image cache and frozen-backbone features), `knn`, `linear` and `finetune`
(the classification recipes), the dense probes `dense` (segmentation and change detection, a
`DenseTask` each) with `dense_data` (datasets, checks, split by image), `dense_head` (heads and
their recipe), `dense_metrics` and `tiling` (sliding windows), `run` (`evaluate`, any protocol),
`online` and `online_dense` (the kNN monitor and the dense probe for the train loop), `periodic`
(what the train loop runs) and `reconstruction` (the student's MIM output for the reconstruction
grids).
"""

from cmid_jax.evaluation.features import FeatureExtractor, load_images
from cmid_jax.evaluation.finetune import FinetuneRecipe, finetune_top1
from cmid_jax.evaluation.knn import knn_scores, knn_top1
from cmid_jax.evaluation.labelled import ClassSplit, list_labelled, load_split, split_per_class
from cmid_jax.evaluation.linear import linear_probe_top1
from cmid_jax.evaluation.online import make_online_knn
from cmid_jax.evaluation.reconstruction import make_reconstruction_fn
from cmid_jax.models.cmid import backbone_variables

__all__ = [
    'ClassSplit',
    'FeatureExtractor',
    'FinetuneRecipe',
    'backbone_variables',
    'finetune_top1',
    'knn_scores',
    'knn_top1',
    'linear_probe_top1',
    'list_labelled',
    'load_images',
    'load_split',
    'make_online_knn',
    'make_reconstruction_fn',
    'split_per_class',
]
