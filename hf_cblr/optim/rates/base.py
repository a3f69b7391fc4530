"""The rate-rule interface and its registry."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from hf_cblr._registry import Registry
from hf_cblr.optim.types import LayerBatch


class RateRule:
    """Base class of the rate rules: :meth:`reference` is the rule."""

    name: ClassVar[str]
    #: The rates depend on all adapted layers together: under ZeRO one ``step`` must see all of them or none.
    needs_all_layers: ClassVar[bool] = False

    def reference(self, batches: list[LayerBatch], curvatures: list[Tensor]) -> Tensor | float:
        """:math:`c_{\\text{ref}}`, from the curvatures of all ``batches`` of the step."""
        raise NotImplementedError

    def rates(self, batches: list[LayerBatch], curvatures: list[Tensor]) -> list[Tensor]:
        """``r_l = clamp(tau c_ref / (c_l + eps_c), min_ratio, max_ratio)``; 1 outside the mask or without an estimate."""
        reference = self.reference(batches, curvatures)
        rates = []
        for batch, curvature in zip(batches, curvatures, strict=True):
            group = batch.group
            rate = (group["trust"] * reference / (curvature + group["curvature_eps"])).clamp_(
                min=group["min_ratio"], max=group["max_ratio"])
            rates.append(torch.where(batch.adapt & (curvature > 0), rate, torch.ones_like(rate)))
        return rates


#: The rules by name; ``@register_rate_rule`` adds a class by its ``name``, which the ``rate_rule`` setting selects.
RATE_RULES: Registry[RateRule] = Registry("rate_rule")
register_rate_rule = RATE_RULES.register
create_rate_rule = RATE_RULES.create
