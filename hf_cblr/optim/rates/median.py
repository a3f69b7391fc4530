r"""MCLR's rule: the rates normalized by the median curvature over the adapted layers.

.. math::  r_l = \min\!\Big(\tau\, \frac{\operatorname{median}_k c_k}{c_l + \epsilon_c},\ r_{\max}\Big)

so the layer of median curvature moves at the base learning rate and ``trust`` is dimensionless.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from hf_cblr.optim.rates.base import RateRule, register_rate_rule
from hf_cblr.optim.types import LayerBatch


@register_rate_rule
class MedianCurvatureRate(RateRule):
    """:math:`c_{\\text{ref}}`: the median curvature over the adapted layers that have an estimate (1 while none has)."""

    name = "median"
    needs_all_layers: ClassVar[bool] = True

    def reference(self, batches: list[LayerBatch], curvatures: list[Tensor]) -> Tensor | float:
        known = torch.cat([c[batch.adapt & (c > 0)] for batch, c in zip(batches, curvatures, strict=True)])
        return known.median() if known.numel() else 1.0
