"""``curvature="weight_norm"``: the curvature of a quadratic whose minimum is at the origin (LARS, LAMB)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from hf_cblr.optim.estimators.base import CurvatureEstimator, nan_where, register_curvature_estimator
from hf_cblr.optim.types import Closure, Direction, EstimateInput, LayerBatch, Prelude


@dataclass
class WeightNormPrelude(Prelude):
    """``|w|`` per layer (from the batch's sums: read it once they are reduced)."""

    weight_norms: Tensor


@register_curvature_estimator
class WeightNormCurvature(CurvatureEstimator):
    """``c = (|g| + beta |w|) / |w|`` (SGD base, CBLR = LARS) or ``c = |u| / |w|`` (Adam base, CBLR = LAMB).

    The curvature of a quadratic whose minimum is at the origin: the gradient there is ``c w``. The numerator is
    the direction's :meth:`~hf_cblr.optim.types.Direction.trust_numerators`. ``|w|`` is taken in :meth:`measure`,
    with the step's other sums (no pass of its own where the fused Adam kernels took it).
    """

    name = "weight_norm"

    def measure(self, batch: LayerBatch, direction: Direction, prelude: Prelude) -> WeightNormPrelude:
        return WeightNormPrelude(prelude.workspace, batch.sums.norms(batch.weights))

    def estimate(self, inputs: list[EstimateInput], closure: Closure | None, step: int) -> list[Tensor]:
        estimates = []
        for x in inputs:
            assert isinstance(x.prelude, WeightNormPrelude)
            weight_norms = x.prelude.weight_norms
            numerators = x.direction.trust_numerators(weight_norms, x.batch.decay)
            estimates.append(nan_where(numerators / weight_norms, weight_norms == 0))
        return estimates
