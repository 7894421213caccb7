"""NeuroOptima: one PyTorch optimizer combining SAM/ASAM, Lookahead, Lion and Adan."""

from .batchnorm import frozen_batchnorm_stats
from .functional import DEFAULT_BETAS, RULE_BUFFERS, UPDATE_RULES
from .optimizer import NeuroOptima, SkippedStepWarning

__all__ = ["NeuroOptima", "SkippedStepWarning", "frozen_batchnorm_stats", "DEFAULT_BETAS", "RULE_BUFFERS",
           "UPDATE_RULES"]
__version__ = "0.1.0"
