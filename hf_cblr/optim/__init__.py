"""The CBLR optimizer family: CBLR, MCLR, LARS, LAMB, their curvature estimators and registry."""

from hf_cblr.optim.cblr import CBLR
from hf_cblr.optim.estimators import CURVATURE_ESTIMATORS, CurvatureEstimator, register_curvature_estimator
from hf_cblr.optim.lamb import LAMB
from hf_cblr.optim.lars import LARS
from hf_cblr.optim.mclr import MCLR
from hf_cblr.optim.param_groups import param_groups
from hf_cblr.optim.registry import OptimInfo, create_optimizer, get_optimizer_info, list_optimizers

__all__ = [
    "CBLR",
    "CURVATURE_ESTIMATORS",
    "LAMB",
    "LARS",
    "MCLR",
    "CurvatureEstimator",
    "OptimInfo",
    "create_optimizer",
    "get_optimizer_info",
    "list_optimizers",
    "param_groups",
    "register_curvature_estimator",
]
