"""tdrlt_peft: geometry-aware, rank-adaptive low-rank (Tucker) training for PEFT and the Trainer (TDLRT).

``import tdrlt_peft`` registers the PEFT method "TDLRT", so ``get_peft_model(model, TuckerAdapterConfig())``,
``PeftModel.from_pretrained`` and ``AutoPeftModel*`` work.
"""

from .layers.adapter import TDLRTLayer
from .layers.factorized import FactorizedConv, FactorizedLinear, factorize
from .layers.inventory import adapter_ranks, count_active_parameters, rank_statistics
from .layers.tracker import IntegratorNotRunError
from .training.callback import TDLRTCallback
from .training.checkpoint import IncompleteCheckpointError, last_complete_checkpoint, verify_checkpoint
from .training.integrator import TDLRTIntegrator
from .training.optimizer import TDLRTOptimizer as TDLRTOptimizer
from .training.trainer import TDLRTTrainer
from .tuner.config import TuckerAdapterConfig
from .tuner.model import TDLRTModel
from .tuner.peft_patches import patch_peft_model
from .tuner.registration import register

register(TuckerAdapterConfig, TDLRTModel)
patch_peft_model()

__version__ = "0.1.0"
__all__ = [
    "TuckerAdapterConfig", "TDLRTModel", "TDLRTLayer", "TDLRTCallback", "TDLRTIntegrator", "TDLRTTrainer",
    "IntegratorNotRunError",
    "adapter_ranks", "count_active_parameters", "rank_statistics",
    "FactorizedLinear", "FactorizedConv", "factorize",
    "IncompleteCheckpointError", "last_complete_checkpoint", "verify_checkpoint",
]
