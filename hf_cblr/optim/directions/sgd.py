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


@dataclass
class FragmentSGDDirection(Direction):
    r"""The direction on fragments (ZeRO partitions, FSDP2 shards), with the sums that give the update's norm.

    The step is :math:`s = \alpha\, b + \gamma\, r\, d` (:math:`b`: the momentum buffer before it; :math:`\alpha, \gamma`
    from the momentum, dampening and Nesterov, :meth:`MomentumSGD._step_norms`), so

    .. math::  |s|^2 = \alpha^2 |b|^2 + 2 \alpha \gamma\, r \langle b, d \rangle + \gamma^2 r^2 |d|^2

    is known from sums taken before the rate :math:`r`, reduced with the step's other sums: no second all-reduce
    after the rates. The sums are of fp64 products (exact for fp32 elements), so that where :math:`b` and :math:`r d`
    nearly cancel, the quadratic loses no more than forming :math:`s` in fp32 does. ``direction_squares``:
    :math:`|d|^2` per layer; ``continuing``: whether each layer has a momentum buffer; ``buffer_squares`` and
    ``buffer_products``: :math:`|b|^2` and :math:`\langle b, d \rangle` of those that have.
    """

    direction_squares: Tensor | None = None
    continuing: Tensor | None = None
    buffer_squares: Tensor | None = None
    buffer_products: Tensor | None = None


@register_direction
class MomentumSGD(BaseDirection):
    r"""``d = g + beta w``; :math:`b \leftarrow \mu b + (1 - \text{dampening})\, r_l d`, :math:`w \leftarrow w - \eta b`
    (Nesterov: :math:`w \leftarrow w - \eta (r_l d + \mu b)`). Its preconditioner is the identity."""

    name = "sgd"
    state_schema: ClassVar[dict[str, StateKind]] = {"momentum_buffer": StateKind.ELEMENT}

    def direction(self, batch: LayerBatch, workspace: list[Tensor | None], steps: list[float] | None, *,
                  gains: bool, norms_before_update: bool = True) -> Direction:
        """``d = g + beta w`` (new tensors only where ``beta != 0``; on the fused kernels, formed by :meth:`update`; on
        fragments with the sums of :class:`FragmentSGDDirection`, whose update norms come from sums taken before the
        step's all-reduce, also on the fused kernels, whose update pass takes its norms after it)."""
        grad_norms = batch.sums.norms(batch.grads)
        if isinstance(batch.ops, FusedTensorListOps) and batch.fragments is None:
            return UnformedSGDDirection(list(batch.grads), grad_norms)
        tensors = plus_decay(batch, list(batch.grads), workspace)
        if batch.fragments is None:
            return Direction(tensors, grad_norms)
        continuing = [bool(batch.group["momentum"]) and "momentum_buffer" in state for state in batch.states]
        buffers = [state["momentum_buffer"] for state, known in zip(batch.states, continuing, strict=True) if known]
        continued = [d for d, known in zip(tensors, continuing, strict=True) if known]
        return FragmentSGDDirection(
            tensors, grad_norms, direction_squares=batch.sums.add(batch.ops.fp64_dots(tensors, tensors)),
            continuing=torch.tensor(continuing, device=batch.decay.device),
            buffer_squares=batch.sums.add(batch.ops.fp64_dots(buffers, buffers)),
            buffer_products=batch.sums.add(batch.ops.fp64_dots(buffers, continued)))

    def update(self, batch: LayerBatch, direction: Direction, rates: Tensor) -> Tensor:
        lr = batch.group["lr"]
        if isinstance(direction, UnformedSGDDirection):
            return lr * self._fused_update(batch, rates).sqrt()
        steps = self._momentum(batch, direction.tensors, list(rates.unbind()))
        if isinstance(direction, FragmentSGDDirection):
            update_norms = lr * self._step_norms(batch, direction, rates)
        else:
            update_norms = lr * batch.ops.norms(steps)
        batch.ops.add_(batch.weights, steps, alpha=-lr)
        return update_norms

    @staticmethod
    def _step_norms(batch: LayerBatch, direction: FragmentSGDDirection, rates: Tensor) -> Tensor:
        r""":math:`|s|` per layer from the direction's reduced sums (:class:`FragmentSGDDirection`), with
        :math:`\alpha, \gamma = \mu, 1 - \text{dampening}` (Nesterov: :math:`\mu^2, 1 + \mu (1 - \text{dampening})`) on
        layers with a momentum buffer, and :math:`0, 1` (Nesterov: :math:`0, 1 + \mu`) on the others, whose buffer
        starts at :math:`r d` (:meth:`_momentum`). The rounding is that of the sums, relative to :math:`(\alpha |b| +
        \gamma r |d|)^2`: it grows only where :math:`b` and :math:`r d` nearly cancel."""
        group = batch.group
        momentum, dampening, nesterov = group["momentum"], group["dampening"], group["nesterov"]
        assert direction.direction_squares is not None and direction.continuing is not None
        assert direction.buffer_squares is not None and direction.buffer_products is not None
        direction_squares = direction.direction_squares
        rates = rates.to(direction_squares)
        alpha, buffer_squares, products = (torch.zeros_like(direction_squares) for _ in range(3))
        gamma = torch.full_like(direction_squares, 1 + momentum if nesterov else 1.0)
        continuing = direction.continuing
        if continuing.any():
            alpha[continuing] = momentum ** 2 if nesterov else momentum
            gamma[continuing] = 1 + momentum * (1 - dampening) if nesterov else 1 - dampening
            buffer_squares[continuing] = direction.buffer_squares
            products[continuing] = direction.buffer_products
        scaled_rates = gamma * rates
        squares = (alpha.square() * buffer_squares + 2 * alpha * scaled_rates * products
                   + scaled_rates.square() * direction_squares)
        return squares.clamp(min=0).sqrt().to(direction.grad_norms.dtype)

    @staticmethod
    def _fused_update(batch: LayerBatch, rates: Tensor) -> Tensor:
        """:meth:`update` in one compiled pass per layer (:func:`~hf_cblr.optim._tensor_ops.momentum_update_kernel`), one
        compiled call for all the batch's layers: the direction, its rate, the momentum buffer (a new one starts at
        ``r d``, as torch's SGD) and the weights; returns the sums of squares of the steps."""
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
