"""``curvature="hutchinson"``: Hutchinson's estimate of the Hessian's diagonal, aggregated per layer."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from hf_cblr.optim.estimators.base import CurvatureEstimator, register_curvature_estimator, require_closure
from hf_cblr.optim.estimators.directional import all_layers, hessian_vector_products
from hf_cblr.optim.types import Closure, EstimateInput, StateKind


@register_curvature_estimator
class HutchinsonCurvature(CurvatureEstimator):
    """Per-element ``P_i |z_i (H z)_i|`` with Rademacher ``z`` (Hutchinson's diagonal), aggregated per layer."""

    name = "hutchinson"
    needs_closure = True
    elementwise = True
    state_schema: ClassVar[dict[str, StateKind]] = {"sample_positions": StateKind.ROW}

    def estimate(self, inputs: list[EstimateInput], closure: Closure | None, step: int) -> list[Tensor]:
        closure = require_closure(self.name, closure)
        batches = [x.batch for x in inputs]
        params, where = all_layers(batches)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        probes = [
            torch.randint(0, 2, param.shape, generator=generator, dtype=torch.float32).mul_(2).sub_(1).to(param.device)
            for param in params
        ]
        products = hessian_vector_products(params, probes, closure)
        estimates = [batch.no_estimates() for batch in batches]
        for (b, i), probe, product in zip(where, probes, products, strict=True):
            batch, direction = batches[b], inputs[b].direction
            positions = self._sample_positions(batch, i)
            diagonal = (probe * product).abs_().reshape(-1)
            diagonal = diagonal if positions is None else diagonal.index_select(0, positions)
            curvature = self._aggregate(diagonal * direction.preconditioner_at(i, positions))
            estimates[b][i] = curvature + batch.decay[i]
        return estimates
