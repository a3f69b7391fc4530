r"""LARS (You et al. 2017, arXiv 1708.03888) as the special case of CBLR it is.

CBLR with the SGD base, ``curvature="weight_norm"`` (:math:`c = (|g| + \beta |w|) / |w|`), no curvature
EMA and no rate cap gives LARS's trust ratio

.. math::  r_l = \frac{\tau\, |w|}{|g| + \beta |w|}

step for step.
"""

from __future__ import annotations

import math
from typing import Any

from hf_cblr.optim.cblr import CBLR
from hf_cblr.optim.partitioned import PartitionLayout


class LARS(CBLR):
    """Layer-wise Adaptive Rate Scaling: momentum SGD with the trust ratio ``trust_coefficient |w| / (|g| + beta |w|)``."""

    @classmethod
    def cblr_arguments(  # type: ignore[override]
        cls,
        *,
        lr: float = 1.0,
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
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
            lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
            trust=trust_coefficient, curvature="weight_norm", rate_rule="inverse_curvature", curvature_ema=0.0,
            curvature_eps=curvature_eps, max_ratio=max_ratio, base="sgd", weight_decay_mask=weight_decay_mask,
            adaptation_mask=adaptation_mask, foreach=foreach, fused=fused, partition_layout=partition_layout,
        )
