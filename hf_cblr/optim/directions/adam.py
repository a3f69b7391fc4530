"""``base="adam"``: the AdamW direction (decoupled weight decay) with a rate per layer."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from hf_cblr.optim._tensor_ops import FusedTensorListOps, TensorList, TensorListOps, compute_dtype
from hf_cblr.optim.directions.base import BaseDirection, register_direction
from hf_cblr.optim.types import Direction, LayerBatch, StateKind


@dataclass
class AdamDirection(Direction):
    r"""The Adam direction, with its preconditioner :math:`P = 1 / (\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon)` kept as
    its parts, ``second_moments`` :math:`v` and ``inverse_sqrt_bias_corrections2``, and formed where used."""

    second_moments: TensorList | None = None
    #: :math:`1 / \sqrt{1 - \beta_2^{t_l}}` per layer
    inverse_sqrt_bias_corrections2: list[float] | None = None
    eps: float = 0.0
    #: :math:`|m|`, :math:`|q|` and :math:`\sqrt{1 - \beta_2^{t_l}}` per layer where asked for (:meth:`Adam.direction`'s
    #: ``gains``), from which :meth:`gains` forms the gains once the batch's sums are reduced
    momentum_norms: Tensor | None = None
    quotient_norms: Tensor | None = None
    sqrt_bias_corrections2: Tensor | None = None

    def gains(self) -> Tensor | float:
        r""":math:`|P \hat m| / |\hat m| = \sqrt{b_2}\, |q| / |m|` per layer (0 where :math:`m = 0`)."""
        assert self.momentum_norms is not None and self.quotient_norms is not None and self.sqrt_bias_corrections2 is not None, \
            "the direction was formed without gains=True"
        layer_gains = self.sqrt_bias_corrections2 * self.quotient_norms / self.momentum_norms
        return torch.where(self.momentum_norms > 0, layer_gains, torch.zeros_like(layer_gains))

    def trust_numerators(self, weight_norms: Tensor, decay: Tensor) -> Tensor:
        return self.norms

    def precondition_(self, tensors: TensorList, ops: TensorListOps) -> None:
        ops.div_(tensors, ops.adam_denominators(self.second_moments, self.inverse_sqrt_bias_corrections2, self.eps))

    def preconditioner_at(self, index: int, positions: Tensor | None) -> Tensor | float:
        second_moment = self.second_moments[index].reshape(-1)
        second_moment = second_moment if positions is None else second_moment.index_select(0, positions)
        return 1.0 / (second_moment.sqrt() * self.inverse_sqrt_bias_corrections2[index] + self.eps)

    def precondition_rows_(self, rows: list[int], values: Tensor, sampled: Callable[[TensorList], Tensor]) -> None:
        denominators = sampled([self.second_moments[i] for i in rows]).sqrt_()
        scales = torch.tensor([self.inverse_sqrt_bias_corrections2[i] for i in rows], device=denominators.device)
        values /= denominators.mul_(scales[:, None]).add_(self.eps)


@dataclass
class UnformedAdamDirection(AdamDirection):
    r"""The direction of the fused kernels, not stored: the reduction pass took its norms, and the update pass forms
    :math:`d = a\, w + b\, m / (\sqrt v + \epsilon')` again from the moments, with the ``coefficients`` rows of
    :func:`~hf_cblr.optim._tensor_ops.adam_direction_kernel`. ``tensors`` hold the first moments :math:`m` (the
    estimators that run on the fused kernels read only the norms, the gains and the preconditioner).

    With ``one_pass`` no pass has run yet: the update's pass (:func:`~hf_cblr.optim._tensor_ops.adam_step_kernel`)
    updates the moments, forms :math:`d`, applies the step and takes the norms, which it writes into ``grad_norms`` and
    ``tensor_norms`` (NaN until then). Before it, the preconditioner at sampled elements is formed from the gradient
    ``grads`` and the previous :math:`v`: :math:`v' = \beta_2 v + (1 - \beta_2) g^2`, as the pass will."""

    coefficients: Tensor | None = None
    one_pass: bool = False
    grads: TensorList | None = None

    def _second_moments_at(self, rows: list[int], sampled: Callable[[TensorList], Tensor]) -> Tensor:
        """:math:`v` of the layers ``rows`` at their sampled elements, after this step's update of the moments."""
        assert self.second_moments is not None and self.coefficients is not None
        second_moments = sampled([self.second_moments[i] for i in rows])
        if not self.one_pass:
            return second_moments
        assert self.grads is not None
        grads = sampled([self.grads[i] for i in rows])
        beta2, one_minus_beta2 = self.coefficients[rows, 1:3].to(grads).unbind(1)
        return second_moments * beta2[:, None] + grads * (grads * one_minus_beta2[:, None])

    def preconditioner_at(self, index: int, positions: Tensor | None) -> Tensor | float:
        def at_positions(tensors: TensorList) -> Tensor:
            flat = tensors[0].reshape(-1)
            return (flat if positions is None else flat.index_select(0, positions))[None]

        second_moment = self._second_moments_at([index], at_positions)[0]
        return 1.0 / (second_moment.sqrt() * self.inverse_sqrt_bias_corrections2[index] + self.eps)

    def precondition_rows_(self, rows: list[int], values: Tensor, sampled: Callable[[TensorList], Tensor]) -> None:
        denominators = self._second_moments_at(rows, sampled).sqrt_()
        scales = torch.tensor([self.inverse_sqrt_bias_corrections2[i] for i in rows], device=denominators.device)
        values /= denominators.mul_(scales[:, None]).add_(self.eps)


@register_direction
class Adam(BaseDirection):
    r""":math:`m \leftarrow \beta_1 m + (1-\beta_1) g`, :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`,
    :math:`u = \hat m / (\sqrt{\hat v} + \epsilon) + \beta w`, :math:`w \leftarrow w - \eta\, r_l\, u`."""

    name = "adam"
    state_schema: ClassVar[dict[str, StateKind]] = {"exp_avg": StateKind.ELEMENT, "exp_avg_sq": StateKind.ELEMENT}
    needs_step_counts = True

    def new_state(self, param: Tensor) -> dict[str, Any]:
        dtype = compute_dtype(param)
        return {"exp_avg": torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)}

    def direction(self, batch: LayerBatch, workspace: list[Tensor | None], steps: list[float] | None, *,
                  gains: bool, norms_before_update: bool = True) -> AdamDirection:
        r"""Update Adam's moments and form ``u = m_hat / (sqrt(v_hat) + eps) + beta w`` in one new tensor per layer.

        With the bias corrections :math:`b_1 = 1 - \beta_1^t`, :math:`b_2 = 1 - \beta_2^t` of the layer's step,
        :math:`s = \sqrt{b_2} / b_1` and :math:`q = m / (\sqrt v + \epsilon \sqrt{b_2})`,

        .. math::  u = s\, q + \beta w = \beta\, \Big(w + \frac{s}{\beta}\, q\Big)

        so the bias corrections are per-layer scalars and cost no pass over the layer: the direction's tensors
        hold :math:`q`, or on decayed layers :math:`w + (s / \beta) q` (one fused pass), and its scales the factor
        (:math:`s`, or :math:`\beta`) that the update folds into the layer rate. ``sqrt(v)`` goes into the
        ``workspace`` an estimator lends (the secant's previous-gradient buffer) or else into the one new tensor,
        then is overwritten in place. With ``gains`` (the secant estimators) the preconditioner's gain
        :math:`|P \hat m| / |\hat m| = \sqrt{b_2}\, |q| / |m|` is computed too: there ``q`` is formed first, its
        norm taken in one ``batch.sums.norms`` call with ``|g|`` and ``|m|``, and ``(\beta / s) w`` added after. On the fused
        kernels (:class:`~hf_cblr.optim._tensor_ops.FusedTensorListOps`) all of it is one compiled pass per layer, one
        compiled call for the batch's layers (:meth:`_fused_direction`).
        """
        assert steps is not None
        beta1, beta2 = batch.group["betas"]
        beta = batch.group["weight_decay"]
        ops, grads, weights = batch.ops, batch.grads, batch.weights
        exp_avgs = [state["exp_avg"] for state in batch.states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in batch.states]
        bias_corrections1 = [_bias_correction(beta1, step) for step in steps]
        sqrt_bias_corrections2 = [math.sqrt(_bias_correction(beta2, step)) for step in steps]
        scales = [c2 / c1 for c1, c2 in zip(bias_corrections1, sqrt_bias_corrections2, strict=True)]
        decay = batch.decay.tolist()
        if isinstance(ops, FusedTensorListOps):
            return self._fused_direction(batch, ops, sqrt_bias_corrections2, scales,
                                         [value != 0 for value in decay], gains=gains,
                                         one_pass=not norms_before_update and not gains and batch.fragments is None)
        decayed = [i for i, value in enumerate(decay) if value != 0]
        ops.lerp_(exp_avgs, grads, 1 - beta1)
        ops.mul_(exp_avg_sqs, beta2)
        ops.addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        direction = ops.sqrt(exp_avg_sqs, outs=workspace)
        ops.add_scalars_(direction, [batch.group["eps"] * c2 for c2 in sqrt_bias_corrections2])
        momentum_norms = q_norms = None
        if gains:
            ops.divide_into_(exp_avgs, direction)
            grad_norms, momentum_norms, q_norms = batch.sums.norms(grads + exp_avgs + direction).split(len(batch))
            ops.add_scaled_([direction[i] for i in decayed], [weights[i] for i in decayed], [beta / scales[i] for i in decayed])
            direction_norms = batch.sums.norms(direction)
        else:
            plain = [i for i, value in enumerate(decay) if value == 0]
            ops.divide_into_([exp_avgs[i] for i in plain], [direction[i] for i in plain])
            ops.addcdiv_into_([weights[i] for i in decayed], [exp_avgs[i] for i in decayed], [direction[i] for i in decayed],
                              [scales[i] / beta for i in decayed])
            for i in decayed:
                scales[i] = beta
            grad_norms, direction_norms = batch.sums.norms(grads + direction).split(len(batch))
        return AdamDirection(
            tensors=direction, grad_norms=grad_norms, scales=torch.tensor(scales, device=batch.decay.device),
            tensor_norms=direction_norms, second_moments=exp_avg_sqs,
            inverse_sqrt_bias_corrections2=[1 / c2 for c2 in sqrt_bias_corrections2], eps=batch.group["eps"],
            momentum_norms=momentum_norms, quotient_norms=q_norms,
            sqrt_bias_corrections2=torch.tensor(sqrt_bias_corrections2, device=grad_norms.device) if gains else None,
        )

    @staticmethod
    def _fused_direction(batch: LayerBatch, ops: FusedTensorListOps, sqrt_bias_corrections2: list[float],
                         scales: list[float], decayed: list[bool], *, gains: bool, one_pass: bool) -> AdamDirection:
        r""":meth:`direction` in one compiled pass per layer (:func:`~hf_cblr.optim._tensor_ops.adam_direction_kernel`), one
        compiled call for all the batch's layers; the update pass forms the direction again (:class:`UnformedAdamDirection`:
        no full-size temporary, and no use of a lent workspace).

        The kernel takes the norms of :math:`d = a\, w + b\, q` with :math:`q = m / (\sqrt v + \epsilon \sqrt{b_2})`, the
        norms the foreach path takes: with ``gains``, :math:`d = q + (\beta / s) w` and the scale :math:`s`; without,
        :math:`d = w + (s / \beta) q` and the scale :math:`\beta` on decayed layers, :math:`d = q` and :math:`s` on the others.
        """
        beta1, beta2 = batch.group["betas"]
        beta, eps = batch.group["weight_decay"], batch.group["eps"]
        rows = []
        for i, (c2, scale) in enumerate(zip(sqrt_bias_corrections2, scales, strict=True)):
            if not decayed[i]:
                weight_coefficient, quotient_coefficient = 0.0, 1.0
            elif gains:
                weight_coefficient, quotient_coefficient = beta / scale, 1.0
            else:
                weight_coefficient, quotient_coefficient, scales[i] = 1.0, scale / beta, beta
            rows.append([1 - beta1, beta2, 1 - beta2, eps * c2, weight_coefficient, quotient_coefficient])
        exp_avgs = [state["exp_avg"] for state in batch.states]
        exp_avg_sqs = [state["exp_avg_sq"] for state in batch.states]
        coefficients = torch.tensor(rows, dtype=batch.decay.dtype, device=batch.decay.device)
        formed: dict[str, Any] = {
            "tensors": exp_avgs, "scales": torch.tensor(scales, device=batch.decay.device), "second_moments": exp_avg_sqs,
            "inverse_sqrt_bias_corrections2": [1 / c2 for c2 in sqrt_bias_corrections2], "eps": eps,
            "coefficients": coefficients}
        if one_pass:  # the update's pass takes the norms (UnformedAdamDirection)
            unknown = torch.full((len(batch),), math.nan, dtype=batch.decay.dtype, device=batch.decay.device)
            return UnformedAdamDirection(**formed, grad_norms=unknown, tensor_norms=unknown.clone(), one_pass=True,
                                         grads=list(batch.grads))
        sums = ops.adam_direction(batch.grads, batch.weights, exp_avgs, exp_avg_sqs, coefficients).sqrt().unbind(1)
        # on fragments partial norms, reduced with the step's other sums; |w| for the weight-norm curvature (LAMB)
        grad_norms, momentum_norms, q_norms, direction_norms = (batch.sums.add_norms(norms) for norms in sums[:4])
        batch.sums.add_norms(sums[4], of=batch.weights)
        return UnformedAdamDirection(
            **formed, grad_norms=grad_norms, tensor_norms=direction_norms,
            momentum_norms=momentum_norms if gains else None, quotient_norms=q_norms if gains else None,
            sqrt_bias_corrections2=torch.tensor(sqrt_bias_corrections2, device=grad_norms.device) if gains else None)

    def update(self, batch: LayerBatch, direction: Direction, rates: Tensor) -> Tensor:
        lr = batch.group["lr"]
        if isinstance(direction, UnformedAdamDirection):
            assert isinstance(batch.ops, FusedTensorListOps) and direction.scales is not None
            factors = lr * rates * direction.scales.to(rates.device)
            if direction.one_pass:
                sums = batch.ops.adam_step(batch.grads, batch.weights, direction.tensors, direction.second_moments,
                                           direction.coefficients, factors)
                grad_norms, _, _, direction_norms, _ = sums.sqrt().unbind(1)
                direction.grad_norms.copy_(grad_norms)
                direction.tensor_norms.copy_(direction_norms)
            else:
                batch.ops.adam_update(batch.weights, direction.tensors, direction.second_moments, direction.coefficients,
                                      factors)
        else:
            batch.ops.addcmul_(batch.weights, direction.tensors, list((rates * direction.scales).unbind()), value=-lr)
        return lr * rates * direction.norms


def _bias_correction(beta: float, step: float) -> float:
    """Adam's ``1 - beta^t`` as ``-expm1(t log beta)``, which keeps full precision for ``beta`` near 1, where
    ``1 - beta^t`` cancels digits."""
    if beta == 0:
        return 1.0
    return -math.expm1(step * math.log(beta))
