"""``curvature="weight_norm"``: the curvature of a quadratic whose minimum is at the origin (LARS, LAMB)."""

from __future__ import annotations

from torch import Tensor

from hf_cblr.optim.estimators.base import CurvatureEstimator, nan_where, register_curvature_estimator
from hf_cblr.optim.types import Closure, EstimateInput


@register_curvature_estimator
class WeightNormCurvature(CurvatureEstimator):
    """``c = (|g| + beta |w|) / |w|`` (SGD base, CBLR = LARS) or ``c = |u| / |w|`` (Adam base, CBLR = LAMB).

    The curvature of a quadratic whose minimum is at the origin: the gradient there is ``c w``. The numerator is
    the direction's :meth:`~hf_cblr.optim.types.Direction.trust_numerators`.
    """

    name = "weight_norm"

    def estimate(self, inputs: list[EstimateInput], closure: Closure | None, step: int) -> list[Tensor]:
        estimates = []
        for x in inputs:
            weight_norms = x.batch.ops.norms(x.batch.weights)
            numerators = x.direction.trust_numerators(weight_norms, x.batch.decay)
            estimates.append(nan_where(numerators / weight_norms, weight_norms == 0))
        return estimates
