"""``base="sgd"``: momentum SGD, the paper's base, as ``torch.optim.SGD`` with a rate per layer."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from hf_cblr.optim._tensor_ops import TensorList
from hf_cblr.optim.directions.base import BaseDirection, plus_decay, register_direction
from hf_cblr.optim.types import Direction, LayerBatch, StateKind


@register_direction
class MomentumSGD(BaseDirection):
    r"""``d = g + beta w``; :math:`b \leftarrow \mu b + (1 - \text{dampening})\, r_l d`, :math:`w \leftarrow w - \eta b`
    (Nesterov: :math:`w \leftarrow w - \eta (r_l d + \mu b)`). Its preconditioner is the identity."""

    name = "sgd"
    state_schema: ClassVar[dict[str, StateKind]] = {"momentum_buffer": StateKind.ELEMENT}

    def direction(self, batch: LayerBatch, workspace: list[Tensor | None], steps: list[float] | None, *,
                  gains: bool) -> Direction:
        """``d = g + beta w`` (new tensors only where ``beta != 0``)."""
        grad_norms = batch.ops.norms(batch.grads)
        return Direction(plus_decay(batch, list(batch.grads), workspace), grad_norms)

    def update(self, batch: LayerBatch, direction: Direction, rates: Tensor) -> Tensor:
        lr = batch.group["lr"]
        steps = self._momentum(batch, direction.tensors, list(rates.unbind()))
        update_norms = lr * batch.ops.norms(steps)
        batch.ops.add_(batch.weights, steps, alpha=-lr)
        return update_norms

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
