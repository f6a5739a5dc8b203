"""optimum-moeq: mixed-bit Mixture-of-Experts quantization for Hugging Face Transformers.

Importing the package registers ``RouterNormConfig`` and its quantizer with transformers.
"""

from .allocate import allocate
from .allocation import Allocation, LayerSignals, allocate_layers
from .config import RouterNormConfig
from .footprint import ExpertsFootprint, ModelFootprint, experts_footprint, model_footprint
from .nn import MixedBitExperts
from .quantizer import RouterNormHfQuantizer
from .saved_checkpoint import verify_checkpoint

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "ExpertsFootprint",
    "LayerSignals",
    "ModelFootprint",
    "MixedBitExperts",
    "RouterNormConfig",
    "RouterNormHfQuantizer",
    "__version__",
    "allocate",
    "allocate_layers",
    "experts_footprint",
    "model_footprint",
    "verify_checkpoint",
]
