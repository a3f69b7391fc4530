"""``curvature="secant"``: the curvature along the last step, from two consecutive gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from hf_cblr.optim._tensor_ops import FusedTensorListOps
from hf_cblr.optim.estimators.base import CurvatureEstimator, nan_where, register_curvature_estimator
from hf_cblr.optim.types import Closure, EstimateInput, LayerBatch, Prelude, StateKind


@dataclass
class SecantPrelude(Prelude):
    """Which layers have a previous gradient (``continuing``), and their ``|g_t - g_{t-1}|`` (``continuing_norms``, from the
    batch's sums: read :attr:`grad_change_norms` once they are reduced)."""

    continuing: Tensor
    continuing_norms: Tensor
    #: the previous-gradient buffers already hold :math:`g_t` (the fused kernels' one pass): nothing to copy at the end
    holds_current: bool = field(default=False, kw_only=True)

    @property
    def grad_change_norms(self) -> Tensor:
        """``|g_t - g_{t-1}|`` per layer, NaN where there is no previous gradient."""
        norms = torch.full(self.continuing.shape, math.nan, device=self.continuing.device)
        norms[self.continuing] = self.continuing_norms.to(norms)
        return norms


@register_curvature_estimator
class SecantCurvature(CurvatureEstimator):
    """``c = p |g_t - g_{t-1}| / |w_t - w_{t-1}| + beta``: a secant along the last step.

    ``p`` is the gain of the base preconditioner on the layer: 1 for the SGD base, and
    ``|P m_hat| / |m_hat|`` for the Adam base (a scalar fit of ``P``; the element-wise ``|P dg|``
    explodes on elements whose ``v`` is near zero, where Adam's step is bounded). Needs the previous
    gradient (one fp32 copy) and the norm of the last update, which the step passes in, so no copy of the
    weights is kept.

    The previous-gradient buffer does double duty: :meth:`prepare` forms ``g_{t-1} - g_t`` in it
    and takes the norm, the step then uses it as the workspace of its direction, and :meth:`finish`
    copies ``g_t`` into it. So the secant costs the step no new tensor (``docs/algorithm.md``, "Numerics").
    On the fused kernels (which need no workspace) :meth:`prepare` does both in one pass instead
    (:meth:`~hf_cblr.optim._tensor_ops.FusedTensorListOps.replace`), which on the C++ kernels also takes
    ``|g_t|``, so the direction takes no norm pass of its own over the gradients.
    """

    name = "secant"
    needs_preconditioner_gains = True
    state_schema: ClassVar[dict[str, StateKind]] = {"prev_grad": StateKind.ELEMENT}

    def prepare(self, batch: LayerBatch) -> SecantPrelude:
        continuing = ["prev_grad" in state for state in batch.states]
        has_previous = [i for i, known in enumerate(continuing) if known]
        previous = [batch.states[i]["prev_grad"] for i in has_previous]
        current = [batch.grads[i] for i in has_previous]
        workspace: list[Tensor | None] = [None] * len(batch)
        known = torch.tensor(continuing, device=batch.decay.device)
        if isinstance(batch.ops, FusedTensorListOps):
            changes, current_norms = batch.ops.replace(previous, current)
            if current_norms is not None:  # |g_t|, which the direction reads: no pass of its own
                batch.sums.add_norms(current_norms, of=current)
            return SecantPrelude(workspace, known, batch.sums.add_norms(changes), holds_current=True)
        batch.ops.sub_(previous, current)  # sign is irrelevant to the norm
        for i, buffer in zip(has_previous, previous, strict=True):
            workspace[i] = buffer
        return SecantPrelude(workspace, known, batch.sums.norms(previous))

    def estimate(self, inputs: list[EstimateInput], closure: Closure | None, step: int) -> list[Tensor]:
        estimates = []
        for x in inputs:
            step_norms = x.last_update_norms
            secants = x.direction.gains() * x.prelude.grad_change_norms / step_norms + x.batch.decay  # NaN: no previous
            estimates.append(nan_where(secants, step_norms == 0))
        return estimates

    def finish(self, batch: LayerBatch, prelude: Prelude) -> None:
        assert isinstance(prelude, SecantPrelude)
        if not prelude.holds_current:
            continuing = [i for i, state in enumerate(batch.states) if "prev_grad" in state]
            batch.ops.copy_([batch.states[i]["prev_grad"] for i in continuing], [batch.grads[i] for i in continuing])
        for i, state in enumerate(batch.states):
            if "prev_grad" not in state:
                state["prev_grad"] = batch.grads[i].detach().clone(memory_format=torch.preserve_format)
