"""tdrlt_peft: geometry-aware, rank-adaptive low-rank (Tucker) training for PEFT and the Trainer (TDLRT).

``import tdrlt_peft`` registers the PEFT method "TDLRT", so ``get_peft_model(model, TuckerAdapterConfig())``,
``PeftModel.from_pretrained`` and ``AutoPeftModel*`` work.
"""

from .callback import TDLRTCallback
from .checkpoint import IncompleteCheckpointError, last_complete_checkpoint, verify_checkpoint
from .config import TuckerAdapterConfig
from .factorized import FactorizedConv, FactorizedLinear, factorize
from .integrator import TDLRTIntegrator, adapter_ranks, count_active_parameters, rank_statistics
from .layer import TDLRTLayer
from .model import TDLRTModel
from .peft_patches import patch_peft_model
from .registration import register
from .storage import IntegratorNotRunError
from .trainer import TDLRTTrainer

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
