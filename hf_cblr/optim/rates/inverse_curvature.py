r"""CBLR's rule, :math:`r_l = \tau / (c_l + \epsilon_c)` (:math:`c_{\text{ref}} = 1`); with the weight-norm curvature it
is the trust ratio of LARS and LAMB."""

from __future__ import annotations

from torch import Tensor

from hf_cblr.optim.rates.base import RateRule, register_rate_rule
from hf_cblr.optim.types import LayerBatch


@register_rate_rule
class InverseCurvatureRate(RateRule):
    """:math:`c_{\\text{ref}} = 1`: a layer takes the fraction :math:`\\eta \\tau` of its Newton step."""

    name = "inverse_curvature"

    def reference(self, batches: list[LayerBatch], curvatures: list[Tensor]) -> Tensor | float:
        return 1.0
