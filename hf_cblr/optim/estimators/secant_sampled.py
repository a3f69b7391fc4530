r"""``curvature="secant_sampled"``: the layer secant over the element sample, with the exact element preconditioner."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hf_cblr.optim.estimators.base import register_curvature_estimator
from hf_cblr.optim.estimators.secant_elementwise import ElementwiseSecantCurvature, moved_elements


@register_curvature_estimator
class SampledSecantCurvature(ElementwiseSecantCurvature):
    r"""The layer secant :math:`\|P \Delta g\| / \|\Delta w\|` taken over the layer's fixed element sample (the one of
    ``secant_elementwise``: ``sample_size`` elements, all of a smaller layer), over the elements the last step moved:

    .. math::

        c = \sqrt{\frac{\sum_{i \in S} (P_i\, \Delta g_i)^2}{\sum_{i \in S} \Delta w_i^2}} + \beta,\qquad
        S = \{i : |\Delta w_i| > 10^{-3}\, \overline{|\Delta w|}\}

    It is the Δw²-weighted root mean square of the per-element secants :math:`P_i |\Delta g_i| / |\Delta w_i|` of
    ``secant_elementwise``, so a layer's curvature, not the median of its elements' (MCLR). Against ``secant`` (the
    whole layer, :math:`P` by its scalar gain on :math:`\hat m`) it applies each element's own preconditioner; on the
    Adam base :math:`P_i \Delta g_i = \Delta g_i / \sqrt{\hat v_i}` and :math:`\Delta w_i \propto \hat m_i /
    \sqrt{\hat v_i}`, both normalized per element, so no element with a small :math:`v` dominates the sums. The sample
    is the state (``2 × sample_size`` values per layer): no full-size copy of the gradient, and on the fused Adam kernels
    the step stays one pass (the estimate reads only the preconditioner at the samples).
    """

    name = "secant_sampled"
    elementwise = False  # a layer's secant, not an aggregate of per-element curvatures (MCLR takes those)

    def _row_estimates(self, grad_changes: Tensor, steps: Tensor) -> Tensor:
        moved = moved_elements(steps)
        signal = torch.where(moved, grad_changes.square(), 0.0).sum(dim=1)
        length = torch.where(moved, steps.square(), 0.0).sum(dim=1)
        return torch.where(length > 0, (signal / length).sqrt(), math.nan)

    def _secant(self, grad_change: Tensor, weight_change: Tensor) -> Tensor:
        return self._row_estimates(grad_change[None], weight_change[None])[0]
