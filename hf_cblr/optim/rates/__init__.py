r"""Rate rules: how the smoothed curvatures :math:`c_l` become the layer rates :math:`r_l`, one rule per module.

Every rule is :math:`r_l = \operatorname{clamp}(\tau\, c_{\text{ref}} / (c_l + \epsilon_c),\ r_{\min},\ r_{\max})` on the
layers of the adaptation mask that have an estimate, and 1 elsewhere; a rule chooses the reference
:math:`c_{\text{ref}}`. Add a rule with one file: subclass :class:`RateRule` and decorate it with
:func:`register_rate_rule`.
"""

from hf_cblr.optim.rates.base import RATE_RULES, RateRule, create_rate_rule, register_rate_rule
from hf_cblr.optim.rates.inverse_curvature import InverseCurvatureRate
from hf_cblr.optim.rates.median import MedianCurvatureRate

__all__ = ["RATE_RULES", "InverseCurvatureRate", "MedianCurvatureRate", "RateRule", "create_rate_rule",
           "register_rate_rule"]
