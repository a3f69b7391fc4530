"""Tensor-list kernels behind the optimizers: one multi-tensor (foreach) path, one single-tensor path.

Every optimizer step in this package is written once, against :class:`TensorListOps`. The two
implementations compute the same arithmetic (to rounding: off the CPU the foreach ``divide_into_`` and
``addcdiv_into_`` multiply by a reciprocal; the tests hold the paths to 1e-6 relative); the foreach one
launches one kernel per operation for the whole list (``torch._foreach_*``), the single-tensor one
loops over tensors in Python and is the readable reference. :func:`select_ops` is the one place that picks a path, as torch's
``_default_to_fused_or_foreach`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

TensorList = list[Tensor]


def compute_dtype(tensor: Tensor) -> torch.dtype:
    """The precision the step computes a tensor's layer in: fp64 for fp64 parameters, fp32 for every other dtype
    (bf16 and fp16 parameters have fp32 state and arithmetic)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


class TensorListOps:
    """Single-tensor reference path: a Python loop of ordinary torch ops."""

    def norms(self, xs: Sequence[Tensor]) -> Tensor:
        """The 2-norm of every tensor, stacked into one vector of ``len(xs)`` (fp32; fp64 where a tensor is fp64)."""
        if not xs:
            return torch.empty(0)
        return torch.stack([torch.linalg.vector_norm(x, dtype=compute_dtype(x)) for x in xs])

    def add(self, xs: Sequence[Tensor], ys: Sequence[Tensor], alpha: float = 1.0,
            outs: Sequence[Tensor | None] | None = None) -> TensorList:
        """``x + alpha y``, written into ``outs`` where given (see :meth:`sqrt`)."""
        return [torch.add(x, y, alpha=alpha, out=out) if out is not None else x.add(y, alpha=alpha)
                for x, y, out in zip(xs, ys, outs or [None] * len(xs), strict=True)]

    def add_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], alpha: float = 1.0) -> None:
        for x, y in zip(xs, ys, strict=True):
            x.add_(y, alpha=alpha)

    def sub_(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        for x, y in zip(xs, ys, strict=True):
            x.sub_(y)

    def mul(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> TensorList:
        return [x.mul(y) for x, y in zip(xs, ys, strict=True)]

    def mul_(self, xs: Sequence[Tensor], ys: Sequence[Tensor] | float) -> None:
        factors = ys if isinstance(ys, Sequence) else [ys] * len(xs)
        for x, y in zip(xs, factors, strict=True):
            x.mul_(y)

    def div_(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        for x, y in zip(xs, ys, strict=True):
            x.div_(y)

    def copy_(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        for x, y in zip(xs, ys, strict=True):
            x.copy_(y)

    def lerp_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], weight: float) -> None:
        for x, y in zip(xs, ys, strict=True):
            x.lerp_(y, weight)

    def addcmul_(
        self, xs: Sequence[Tensor], ys: Sequence[Tensor], zs: Sequence[Tensor], value: float = 1.0
    ) -> None:
        for x, y, z in zip(xs, ys, zs, strict=True):
            x.addcmul_(y, z, value=value)

    def add_scalars_(self, xs: Sequence[Tensor], scalars: Sequence[float]) -> None:
        """``x += s``, one scalar per tensor."""
        for x, scalar in zip(xs, scalars, strict=True):
            x.add_(scalar)

    def add_scaled_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], alphas: Sequence[float]) -> None:
        """``x += a y``, one factor ``a`` per tensor."""
        for x, y, alpha in zip(xs, ys, alphas, strict=True):
            x.add_(y, alpha=alpha)

    def sqrt(self, xs: Sequence[Tensor], outs: Sequence[Tensor | None] | None = None) -> TensorList:
        """``sqrt(x)``, written into ``outs`` where given: buffers of the same size that the caller lends
        (``None`` entries, or no ``outs``: new tensors). On the CPU a new large tensor page-faults on
        first write, which costs more than the computation (``docs/benchmarks.md``)."""
        return [torch.sqrt(x, out=out) if out is not None else x.sqrt()
                for x, out in zip(xs, outs or [None] * len(xs), strict=True)]

    def divide_into_(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        """``y <- x / y`` in place: the quotient in the divisor's storage, one pass and no new tensor."""
        for x, y in zip(xs, ys, strict=True):
            torch.div(x, y, out=y)

    def addcdiv_into_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], zs: Sequence[Tensor], values: Sequence[float]) -> None:
        """``z <- x + a y / z`` in place, one factor ``a`` per tensor: one pass and no new tensor."""
        for x, y, z, value in zip(xs, ys, zs, values, strict=True):
            torch.addcdiv(x, y, z, value=value, out=z)

    def adam_denominators(
        self, second_moments: Sequence[Tensor], inverse_sqrt_bias_corrections: Sequence[float], eps: float
    ) -> TensorList:
        """Adam's denominators ``sqrt(v) / sqrt(bias_correction2) + eps``, as new tensors."""
        return [
            v.sqrt().mul_(factor).add_(eps)
            for v, factor in zip(second_moments, inverse_sqrt_bias_corrections, strict=True)
        ]

    def dot(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
        """Per-tensor inner products ``<x, y>`` as one vector (fp32; fp64 where a tensor is fp64)."""
        if not xs:
            return torch.empty(0)
        return torch.stack([torch.sum(x.to(compute_dtype(x)) * y.to(compute_dtype(x))) for x, y in zip(xs, ys, strict=True)])

    def all_reduce_sum(self, vector: Tensor) -> Tensor:
        """``vector`` summed over the ranks that share the layers (in place); in one process, ``vector`` itself."""
        return vector


class ForeachTensorListOps(TensorListOps):
    """Multi-tensor path: one ``torch._foreach_*`` kernel per operation for the whole list."""

    def norms(self, xs: Sequence[Tensor]) -> Tensor:
        if not xs:
            return torch.empty(0)
        if any(x.dtype == torch.float64 for x in xs):  # one accumulation dtype per foreach call
            return super().norms(xs)
        return torch.stack(torch._foreach_norm(list(xs), 2, dtype=torch.float32))

    def add(self, xs: Sequence[Tensor], ys: Sequence[Tensor], alpha: float = 1.0,
            outs: Sequence[Tensor | None] | None = None) -> TensorList:
        """As :meth:`sqrt`: into the lent buffers on CPU, one foreach kernel into new tensors elsewhere."""
        if outs is not None and _on_cpu(xs) and any(out is not None for out in outs):
            return super().add(xs, ys, alpha, outs)
        return list(torch._foreach_add(list(xs), list(ys), alpha=alpha)) if xs else []

    def add_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], alpha: float = 1.0) -> None:
        if xs:
            torch._foreach_add_(list(xs), list(ys), alpha=alpha)

    def sub_(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        if xs:
            torch._foreach_sub_(list(xs), list(ys))

    def mul(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> TensorList:
        return list(torch._foreach_mul(list(xs), list(ys))) if xs else []

    def mul_(self, xs: Sequence[Tensor], ys: Sequence[Tensor] | float) -> None:
        if xs:
            torch._foreach_mul_(list(xs), list(ys) if isinstance(ys, Sequence) else ys)

    def div_(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        if xs:
            torch._foreach_div_(list(xs), list(ys))

    def copy_(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        if xs:
            torch._foreach_copy_(list(xs), list(ys))

    def lerp_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], weight: float) -> None:
        if xs:
            torch._foreach_lerp_(list(xs), list(ys), weight)

    def addcmul_(
        self, xs: Sequence[Tensor], ys: Sequence[Tensor], zs: Sequence[Tensor], value: float = 1.0
    ) -> None:
        if xs:
            torch._foreach_addcmul_(list(xs), list(ys), list(zs), value=value)

    def add_scalars_(self, xs: Sequence[Tensor], scalars: Sequence[float]) -> None:
        if xs:
            torch._foreach_add_(list(xs), list(scalars))

    def add_scaled_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], alphas: Sequence[float]) -> None:
        """One ``_foreach_add_`` per distinct factor (usually one: the layers of a group share their step)."""
        by_alpha: dict[float, list[int]] = {}
        for i, alpha in enumerate(alphas):
            by_alpha.setdefault(alpha, []).append(i)
        for alpha, indices in by_alpha.items():
            torch._foreach_add_([xs[i] for i in indices], [ys[i] for i in indices], alpha=alpha)

    def sqrt(self, xs: Sequence[Tensor], outs: Sequence[Tensor | None] | None = None) -> TensorList:
        """Into the lent buffers on CPU (one pass per tensor, no page faults); elsewhere one foreach kernel into
        new tensors, which the caching allocator hands out without a pass (writing into the buffers would take two)."""
        if outs is not None and _on_cpu(xs) and any(out is not None for out in outs):
            return super().sqrt(xs, outs)
        return list(torch._foreach_sqrt(list(xs))) if xs else []

    def divide_into_(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> None:
        """torch has no foreach kernel writing ``x / y`` into ``y``. On CPU, where a ``_foreach_*`` op is a loop
        over the tensors anyway, ``div(out=y)`` per tensor is one pass; elsewhere two foreach kernels
        (``1 / y``, then ``* x``) keep the launches per list at two."""
        if not xs:
            return
        if _on_cpu(ys):
            super().divide_into_(xs, ys)
        else:
            torch._foreach_reciprocal_(list(ys))
            torch._foreach_mul_(list(ys), list(xs))

    def addcdiv_into_(self, xs: Sequence[Tensor], ys: Sequence[Tensor], zs: Sequence[Tensor], values: Sequence[float]) -> None:
        """As ``divide_into_``: ``addcdiv(out=z)`` per tensor on CPU, four foreach kernels elsewhere."""
        if not xs:
            return
        if _on_cpu(zs):
            super().addcdiv_into_(xs, ys, zs, values)
        else:
            self.divide_into_(ys, zs)
            torch._foreach_mul_(list(zs), list(values))
            torch._foreach_add_(list(zs), list(xs))

    def adam_denominators(
        self, second_moments: Sequence[Tensor], inverse_sqrt_bias_corrections: Sequence[float], eps: float
    ) -> TensorList:
        if not second_moments:
            return []
        denominators = torch._foreach_sqrt(list(second_moments))
        torch._foreach_mul_(denominators, list(inverse_sqrt_bias_corrections))
        torch._foreach_add_(denominators, eps)
        return list(denominators)


def _on_cpu(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is on the CPU, where a ``_foreach_*`` op is a Python-free loop over the tensors anyway."""
    return all(t.device.type == "cpu" for t in tensors)


#: On the CPU the step runs over chunks of whole layers of about this many elements (4 MiB per fp32
#: tensor), one chunk through all its kernels before the next: see :func:`chunk_elements`.
CPU_CHUNK_ELEMENTS = 1 << 20


def chunk_elements(tensors: Sequence[Tensor]) -> int | None:
    """The most elements the step takes through its kernels at once (``LayerBatch.chunks``).

    On the CPU every kernel is a pass over memory, and one that follows another over the same few MiB
    finds them in the cache: chunks of about :data:`CPU_CHUNK_ELEMENTS`. Elsewhere None, the whole batch:
    a GPU kernel launch costs more than the pass it saves, and a foreach kernel takes the whole list at once.
    """
    return CPU_CHUNK_ELEMENTS if _on_cpu(tensors) else None


SINGLE_TENSOR_OPS = TensorListOps()
FOREACH_OPS = ForeachTensorListOps()


def select_ops(foreach: bool | None, tensors: Sequence[Tensor]) -> TensorListOps:
    """Pick the kernel path: ``foreach=None`` means foreach unless a tensor is sparse or on the meta device."""
    if foreach is None:
        foreach = not any(t.is_sparse or t.device.type == "meta" for t in tensors)
    return FOREACH_OPS if foreach else SINGLE_TENSOR_OPS
