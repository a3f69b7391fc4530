"""The directional estimators ``curvature="hvp"`` and ``"fd"``: the curvature along ``g`` (or ``P g``) from a
Hessian-vector product on the step's batch, through the step's closure."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hf_cblr.optim._tensor_ops import TensorList
from hf_cblr.optim.estimators.base import CurvatureEstimator, register_curvature_estimator, require_closure
from hf_cblr.optim.types import Closure, EstimateInput, LayerBatch


def all_layers(batches: list[LayerBatch]) -> tuple[list[Tensor], list[tuple[int, int]]]:
    params, where = [], []
    for b, batch in enumerate(batches):
        for i, param in enumerate(batch.params):
            params.append(param)
            where.append((b, i))
    return params, where


def _probe_directions(inputs: list[EstimateInput]) -> list[TensorList]:
    """The direction ``v`` the directional estimators probe: ``g`` (SGD base) or ``P g`` (Adam base)."""
    directions = []
    for x in inputs:
        vectors = [grad.clone() for grad in x.batch.grads]
        x.direction.precondition_(vectors, x.batch.ops)
        directions.append(vectors)
    return directions


def hessian_vector_products(params: list[Tensor], vectors: TensorList, closure: Closure) -> TensorList:
    """``H v`` by double backward through ``closure()``; zeros for parameters the loss does not use, and for all of
    them when the loss is linear in the parameters (its gradient has no graph: ``H = 0``)."""
    with torch.enable_grad():
        loss = closure()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [i for i, grad in enumerate(grads) if grad is not None and grad.requires_grad]
        if not used:  # no gradient depends on the parameters: the loss is linear in them, and H = 0
            return [torch.zeros_like(vector) for vector in vectors]
        try:
            products = torch.autograd.grad(
                [grads[i] for i in used], [params[i] for i in used],
                grad_outputs=[vectors[i].to(params[i].dtype) for i in used], allow_unused=True,
            )
        except RuntimeError as error:
            raise RuntimeError(
                "curvature='hvp' needs a double backward through the model, which fused attention kernels "
                "(SDPA, flash-attention, cuDNN) do not have. Load the model with attn_implementation='eager', "
                f"or use curvature='fd', which needs no double backward. Original error: {error}"
            ) from error
    result = [torch.zeros_like(vector) for vector in vectors]
    for i, product in zip(used, products, strict=True):
        if product is not None:
            result[i] = product.to(vectors[i].dtype)
    return result


def finite_difference_hessian_vector_products(
    params: list[Tensor], grads: TensorList, vectors: TensorList, closure: Closure, fd_step: float
) -> TensorList:
    """``H v ~ (grad L(w + eps v) - grad L(w)) / eps`` with ``eps |v| = fd_step``, one extra backward; NaN everywhere
    when ``v`` is not finite (so every layer keeps its previous estimate, as with ``hvp``)."""
    vector_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in vectors])).item()
    if not math.isfinite(vector_norm):  # a non-finite gradient somewhere: no layer has a meaningful probe
        return [torch.full_like(v, math.nan) for v in vectors]
    if vector_norm == 0:
        return [torch.zeros_like(v) for v in vectors]
    epsilon = fd_step / vector_norm
    saved = [param.detach().clone() for param in params]
    try:
        for param, vector in zip(params, vectors, strict=True):
            param.add_(vector.to(param.dtype), alpha=epsilon)
        with torch.enable_grad():
            loss = closure()
            perturbed = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for param, original in zip(params, saved, strict=True):
            param.copy_(original)
    return [
        torch.zeros_like(grad) if new is None else (new.to(grad.dtype) - grad) / epsilon
        for grad, new in zip(grads, perturbed, strict=True)
    ]


class _DirectionalCurvature(CurvatureEstimator):
    """``c = <v, H v> / <g, v> + beta`` per layer, with ``v = g`` (SGD) or ``v = P g`` (Adam).

    For the SGD base this is ``<g, H g> / |g|^2``, the curvature along the gradient: a step of
    ``1 / c`` along ``-g`` minimizes the layer's quadratic model exactly.
    """

    needs_closure = True

    def _products(self, batches: list[LayerBatch], params: list[Tensor], vectors: TensorList,
                  closure: Closure) -> TensorList:
        raise NotImplementedError

    def estimate(self, inputs: list[EstimateInput], closure: Closure | None, step: int) -> list[Tensor]:
        closure = require_closure(self.name, closure)
        batches = [x.batch for x in inputs]
        directions = _probe_directions(inputs)
        params, _ = all_layers(batches)
        vectors = [vector for vectors_of_batch in directions for vector in vectors_of_batch]
        products = iter(self._products(batches, params, vectors, closure))
        estimates = []
        for batch, vectors_of_batch in zip(batches, directions, strict=True):
            products_of_batch = [next(products) for _ in vectors_of_batch]
            curvature = batch.ops.dot(vectors_of_batch, products_of_batch) / batch.ops.dot(batch.grads, vectors_of_batch)
            estimates.append(curvature + batch.decay)
        return estimates


@register_curvature_estimator
class HessianVectorCurvature(_DirectionalCurvature):
    """Directional curvature by an exact Hessian-vector product (double backward)."""

    name = "hvp"

    def _products(self, batches: list[LayerBatch], params: list[Tensor], vectors: TensorList,
                  closure: Closure) -> TensorList:
        return hessian_vector_products(params, vectors, closure)


@register_curvature_estimator
class FiniteDifferenceCurvature(_DirectionalCurvature):
    """Directional curvature by a finite difference of gradients on the same batch."""

    name = "fd"

    def _products(self, batches: list[LayerBatch], params: list[Tensor], vectors: TensorList,
                  closure: Closure) -> TensorList:
        grads = [grad for batch in batches for grad in batch.grads]
        return finite_difference_hessian_vector_products(params, grads, vectors, closure, self.fd_step)
