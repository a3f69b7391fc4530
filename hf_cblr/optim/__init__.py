"""The CBLR optimizer family: CBLR, MCLR, LARS, LAMB, their parts (base directions, curvature estimators, rate rules),
the functional step and the registry. ``docs/architecture.md`` shows how they fit."""

from hf_cblr.optim.cblr import CBLR
from hf_cblr.optim.directions import DIRECTIONS, BaseDirection, register_direction
from hf_cblr.optim.estimators import CURVATURE_ESTIMATORS, CurvatureEstimator, register_curvature_estimator
from hf_cblr.optim.functional import StepParts, cblr_step
from hf_cblr.optim.lamb import LAMB
from hf_cblr.optim.lars import LARS
from hf_cblr.optim.mclr import MCLR
from hf_cblr.optim.param_groups import param_groups
from hf_cblr.optim.rates import RATE_RULES, RateRule, register_rate_rule
from hf_cblr.optim.registry import OptimInfo, create_optimizer, get_optimizer_info, list_optimizers
from hf_cblr.optim.types import Closure, Direction, EstimateInput, LayerBatch, Prelude, StateKind

__all__ = [
    "CBLR",
    "CURVATURE_ESTIMATORS",
    "DIRECTIONS",
    "LAMB",
    "LARS",
    "MCLR",
    "RATE_RULES",
    "BaseDirection",
    "Closure",
    "CurvatureEstimator",
    "Direction",
    "EstimateInput",
    "LayerBatch",
    "OptimInfo",
    "Prelude",
    "RateRule",
    "StateKind",
    "StepParts",
    "cblr_step",
    "create_optimizer",
    "get_optimizer_info",
    "list_optimizers",
    "param_groups",
    "register_curvature_estimator",
    "register_direction",
    "register_rate_rule",
]
