"""``curvature="secant_pooled"``: the denoised secant pooled over steps, a ratio of EMAs."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from hf_cblr.optim.estimators.base import nan_where, register_curvature_estimator
from hf_cblr.optim.estimators.secant_denoised import DenoisedSecantCurvature
from hf_cblr.optim.types import EstimateInput, StateKind


@register_curvature_estimator
class PooledSecantCurvature(DenoisedSecantCurvature):
    r"""The denoised secant pooled over steps: a ratio of EMAs instead of an EMA of ratios.

    .. math::

        S_l \leftarrow \alpha S_l + (1 - \alpha)\,(\|g_t - g_{t-1}\|^2 - V_t - V_{t-1}),\qquad
        D_l \leftarrow \alpha D_l + (1 - \alpha)\,\|w_t - w_{t-1}\|^2,\qquad
        c = p \sqrt{S_l / D_l} + \beta

    with :math:`\alpha` the group's ``curvature_ema``. Under :math:`g_t - g_{t-1} = H \Delta w + \text{noise}`
    each step's denoised :math:`\|\Delta g\|^2` is an unbiased, often negative, estimate of
    :math:`\|H \Delta w\|^2`; the pooled ratio is the least-squares fit of :math:`c^2` over the recent steps, which
    weighs each step by its length. :class:`DenoisedSecantCurvature` keeps only the steps whose signal exceeds the
    noise; when the decaying learning rate shortens the steps, the steps that pass are those whose noise came out
    high, so its curvature drifts up and its rates down. Pooling keeps every step, negative signals included, and
    so has no such selection (``docs/algorithm.md`` §4). A layer has an estimate once :math:`S_l > 0`. The
    estimate is already an average, so the optimizer takes it as it is (no second EMA).
    """

    name = "secant_pooled"
    smoothed = True
    state_schema: ClassVar[dict[str, StateKind]] = {
        **DenoisedSecantCurvature.state_schema, "pooled_signal": StateKind.LAYER, "pooled_step_square": StateKind.LAYER}

    def _secants(self, x: EstimateInput, signal: Tensor, noise: Tensor) -> Tensor:
        batch, step_norms = x.batch, x.last_update_norms
        ema = batch.group["curvature_ema"]
        zero = torch.zeros((), device=signal.device)
        pooled = torch.stack([torch.stack([state.get("pooled_signal", zero), state.get("pooled_step_square", zero)])
                              for state in batch.states])
        fresh = torch.stack([signal.nan_to_num(), step_norms.square()], dim=1)
        valid = (signal.isfinite() & (step_norms > 0)).unsqueeze(1)
        pooled = torch.where(valid, ema * pooled + (1 - ema) * fresh, pooled)
        for state, (pooled_signal, pooled_step_square) in zip(batch.states, pooled, strict=True):
            state["pooled_signal"], state["pooled_step_square"] = pooled_signal.clone(), pooled_step_square.clone()
        ratios = pooled[:, 0] / pooled[:, 1]  # NaN before the first step with a signal
        return nan_where(x.direction.gains() * ratios.clamp(min=0).sqrt() + batch.decay, ~(ratios > 0))
