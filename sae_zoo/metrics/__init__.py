"""torchmetrics ``Metric``s for sparse coding, each with a functional twin in ``sae_zoo.metrics.functional``
that shares its update and compute helpers.

Every metric keeps summed sufficient statistics (``dist_reduce_fx="sum"``), so results streamed over
batches or gathered over DDP ranks equal the one-shot result.
"""

from . import functional
from .code_recovery import MCC, DictionaryMCC
from .collection import SparseCodingMetrics
from .scoring import Scoring
from .detection import FeatureUniqueness, LatentDetection, Shrinkage
from .reconstruction import FractionOfVarianceExplained, FractionOfVarianceUnexplained, ReconstructionMSE
from .sparsity import L0, L1, DeadLatents

__all__ = ["MCC", "DictionaryMCC", "FractionOfVarianceUnexplained", "FractionOfVarianceExplained",
           "ReconstructionMSE", "L0", "L1", "DeadLatents", "LatentDetection", "FeatureUniqueness", "Shrinkage",
           "Scoring", "SparseCodingMetrics", "functional"]
