"""``base="sgd"``: momentum SGD, the paper's base, as ``torch.optim.SGD`` with a rate per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hf_cblr.optim._tensor_ops import FusedTensorListOps, TensorList
from hf_cblr.optim.directions.base import BaseDirection, plus_decay, register_direction
from hf_cblr.optim.types import Direction, LayerBatch, StateKind


@dataclass
class UnformedSGDDirection(Direction):
    r"""The direction of the fused kernels: :math:`d = g + \beta w` is formed inside the update's one pass, so ``tensors``
    hold the gradients :math:`g` (the estimators read only the norms and the identity preconditioner)."""


@register_direction
class MomentumSGD(BaseDirection):
    r"""``d = g + beta w``; :math:`b \leftarrow \mu b + (1 - \text{dampening})\, r_l d`, :math:`w \leftarrow w - \eta b`
    (Nesterov: :math:`w \leftarrow w - \eta (r_l d + \mu b)`). Its preconditioner is the identity."""

    name = "sgd"
    state_schema: ClassVar[dict[str, StateKind]] = {"momentum_buffer": StateKind.ELEMENT}

    def direction(self, batch: LayerBatch, workspace: list[Tensor | None], steps: list[float] | None, *,
                  gains: bool) -> Direction:
        """``d = g + beta w`` (new tensors only where ``beta != 0``; on the fused kernels, formed by :meth:`update`)."""
        grad_norms = batch.ops.norms(batch.grads)
        if isinstance(batch.ops, FusedTensorListOps):
            return UnformedSGDDirection(list(batch.grads), grad_norms)
        return Direction(plus_decay(batch, list(batch.grads), workspace), grad_norms)

    def update(self, batch: LayerBatch, direction: Direction, rates: Tensor) -> Tensor:
        lr = batch.group["lr"]
        if isinstance(direction, UnformedSGDDirection):
            return lr * self._fused_update(batch, rates).sqrt()
        steps = self._momentum(batch, direction.tensors, list(rates.unbind()))
        update_norms = lr * batch.ops.norms(steps)
        batch.ops.add_(batch.weights, steps, alpha=-lr)
        return update_norms

    @staticmethod
    def _fused_update(batch: LayerBatch, rates: Tensor) -> Tensor:
        """:meth:`update` in one compiled pass per layer (:func:`~hf_cblr.optim._tensor_ops.momentum_update_kernel`): the
        direction, its rate, the momentum buffer (a new one starts at ``r d``, as torch's SGD) and the weights; returns
        the sums of squares of the steps."""
        group, ops = batch.group, batch.ops
        assert isinstance(ops, FusedTensorListOps)
        momentum, dampening, nesterov = group["momentum"], group["dampening"], group["nesterov"]
        buffers = None
        starting = [False] * len(batch)
        if momentum != 0:
            starting = ["momentum_buffer" not in state for state in batch.states]
            for state, weight, new in zip(batch.states, batch.weights, starting, strict=True):
                if new:
                    state["momentum_buffer"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
            buffers = [state["momentum_buffer"] for state in batch.states]
        step_factors = (1.0, momentum) if nesterov else (0.0, 1.0)
        rows = torch.tensor([[decay, 0.0, group["lr"], 0.0 if new else momentum, 1.0 if new else 1 - dampening, *step_factors]
                             for decay, new in zip(batch.decay.tolist(), starting, strict=True)],
                            dtype=batch.decay.dtype, device=batch.decay.device)
        rows[:, 1] = rates
        return ops.momentum_update(batch.grads, batch.weights, buffers, rows)

    @staticmethod
    def _momentum(batch: LayerBatch, direction: TensorList, rate_list: list[Tensor]) -> TensorList:
        """The step ``b`` (or Nesterov's ``r d + mu b``) after ``b <- mu b + (1 - dampening) r d``."""
        group, ops = batch.group, batch.ops
        momentum = group["momentum"]
        scaled = None
        if momentum == 0 or group["nesterov"]:
            scaled = ops.mul(direction, rate_list)
            if momentum == 0:
                return scaled
        continuing = [i for i, state in enumerate(batch.states) if "momentum_buffer" in state]
        buffers = [batch.states[i]["momentum_buffer"] for i in continuing]
        ops.mul_(buffers, momentum)
        ops.addcmul_(buffers, [direction[i] for i in continuing], [rate_list[i] for i in continuing],
                     value=1 - group["dampening"])
        for i, state in enumerate(batch.states):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = (direction[i] * rate_list[i]).detach()
        buffers = [state["momentum_buffer"] for state in batch.states]
        if scaled is None:
            return buffers
        ops.add_(scaled, buffers, alpha=momentum)
        return scaled
