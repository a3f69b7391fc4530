"""Curvature estimators: how CBLR measures the curvature ``c_l`` of each layer, one estimator per module.

The interface and the registry are in :mod:`hf_cblr.optim.estimators.base`; importing this package registers
every estimator shipped with hf_cblr.
"""

from hf_cblr.optim.estimators.base import (
    AGGREGATES,
    CURVATURE_ESTIMATORS,
    CurvatureEstimator,
    create_curvature_estimator,
    register_curvature_estimator,
)
from hf_cblr.optim.estimators.directional import FiniteDifferenceCurvature, HessianVectorCurvature
from hf_cblr.optim.estimators.hutchinson import HutchinsonCurvature
from hf_cblr.optim.estimators.secant import SecantCurvature
from hf_cblr.optim.estimators.secant_denoised import DenoisedSecantCurvature
from hf_cblr.optim.estimators.secant_elementwise import ElementwiseSecantCurvature
from hf_cblr.optim.estimators.secant_pooled import PooledSecantCurvature
from hf_cblr.optim.estimators.secant_sampled import SampledSecantCurvature
from hf_cblr.optim.estimators.weight_norm import WeightNormCurvature

__all__ = [
    "AGGREGATES",
    "CURVATURE_ESTIMATORS",
    "CurvatureEstimator",
    "DenoisedSecantCurvature",
    "ElementwiseSecantCurvature",
    "FiniteDifferenceCurvature",
    "HessianVectorCurvature",
    "HutchinsonCurvature",
    "PooledSecantCurvature",
    "SampledSecantCurvature",
    "SecantCurvature",
    "WeightNormCurvature",
    "create_curvature_estimator",
    "register_curvature_estimator",
]
