r"""LAMB (You et al. 2019, arXiv 1904.00962) as the Adam-base special case of CBLR.

CBLR with the Adam base and ``curvature="weight_norm"`` (:math:`c = |u| / |w|`), no curvature EMA
and no rate cap gives LAMB's trust ratio on the bias-corrected AdamW direction ``u``

.. math::  r_l = \frac{\tau\, |w|}{|u|}

step for step.
"""

from __future__ import annotations

import math
from typing import Any

from hf_cblr.optim.cblr import CBLR
from hf_cblr.optim.partitioned import PartitionLayout


class LAMB(CBLR):
    """Layer-wise Adaptive Moments: AdamW's direction ``u`` scaled by ``trust_coefficient |w| / |u|``."""

    @classmethod
    def cblr_arguments(  # type: ignore[override]
        cls,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        trust_coefficient: float = 1.0,
        curvature_eps: float = 1e-8,
        max_ratio: float = math.inf,
        weight_decay_mask: bool | None = None,
        adaptation_mask: bool | None = None,
        foreach: bool | None = None,
        fused: bool | None = None,
        partition_layout: PartitionLayout | None = None,
    ) -> dict[str, Any]:
        """The CBLR arguments of this special case (its own arguments: the class docstring)."""
        return dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust=trust_coefficient,
            curvature="weight_norm", rate_rule="inverse_curvature", curvature_ema=0.0, curvature_eps=curvature_eps,
            max_ratio=max_ratio, base="adam", weight_decay_mask=weight_decay_mask, adaptation_mask=adaptation_mask,
            foreach=foreach, fused=fused, partition_layout=partition_layout,
        )
