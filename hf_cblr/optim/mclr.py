r"""MCLR: CBLR with median curvatures (Gao & Zhong, arXiv 2012.08795).

Each layer's curvature is the **median** of its per-element curvatures (over a fixed random sample
of ``sample_size`` elements for large layers), and the layer rates are normalized by the median
curvature over the adapted layers:

.. math::

    r_l = \min\!\Big(\tau\, \frac{\operatorname{median}_k c_k}{c_l + \epsilon_c},\ r_{\max}\Big)

so the layer of median curvature moves at the base learning rate and ``trust`` is dimensionless.

Under DeepSpeed ZeRO-1/2/3 the rates are those of one process for any world size (``docs/zero.md``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from hf_cblr.optim.cblr import CBLR
from hf_cblr.optim.estimators import CURVATURE_ESTIMATORS

ELEMENTWISE_ESTIMATORS = tuple(sorted(name for name, cls in CURVATURE_ESTIMATORS.items() if cls.elementwise))


class MCLR(CBLR):
    """Median-curvature learning rate. Takes the arguments of :class:`CBLR`; ``curvature`` must be
    element-wise (``secant_elementwise``, the default, or ``hutchinson``); ``aggregate`` and ``rate_rule`` are
    ``median``."""

    rate_rule_before_settings: ClassVar[str] = "median"

    @classmethod
    def cblr_arguments(cls, *, lr: float = 0.1, trust: float = 1.0,  # type: ignore[override]
                       curvature: str = "secant_elementwise", aggregate: str = "median", rate_rule: str = "median",
                       **kwargs: Any) -> dict[str, Any]:
        """CBLR's arguments with MCLR's defaults; ``curvature`` must be element-wise, ``aggregate`` and ``rate_rule``
        the median."""
        if curvature not in ELEMENTWISE_ESTIMATORS:
            raise ValueError(
                f"MCLR needs per-element curvatures: curvature={curvature!r} is not valid; valid values: "
                f"{list(ELEMENTWISE_ESTIMATORS)}"
            )
        if aggregate != "median":
            raise ValueError(f"MCLR aggregates by the median: aggregate={aggregate!r} is not valid; valid values: ['median']")
        if rate_rule != "median":
            raise ValueError(f"MCLR normalizes by the median curvature: rate_rule={rate_rule!r} is not valid; valid "
                             "values: ['median']")
        return super().cblr_arguments(lr=lr, trust=trust, curvature=curvature, aggregate=aggregate, rate_rule=rate_rule,
                                      **kwargs)
