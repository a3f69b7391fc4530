r"""Tensor-list kernels behind the optimizers: one multi-tensor (foreach) path, one single-tensor path, one fused path.

Every optimizer step in this package is written once, against :class:`TensorListOps`. The two
implementations compute the same arithmetic (to rounding: off the CPU the foreach ``divide_into_`` and
``addcdiv_into_`` multiply by a reciprocal; the tests hold the paths to 1e-6 relative); the foreach one
launches one kernel per operation for the whole list (``torch._foreach_*``), the single-tensor one
loops over tensors in Python and is the readable reference. :func:`select_ops` is the one place that picks a path,
as torch's ``_default_to_fused_or_foreach`` does.

The fused path (:class:`FusedTensorListOps`) is the foreach path plus, for the bases' elementwise work, one compiled
pass per layer, which does in one pass over the layer's elements what the foreach path does in several
(``docs/benchmarks.md``, "The fused step"):

- :func:`adam_direction_kernel` (the reduction pass): Adam's moments and the sums of squares of :math:`g`, :math:`m`,
  :math:`q = m / (\sqrt v + \epsilon')` and the direction :math:`d = a\, w + b\, q`, which it does not store;
  :func:`adam_update_kernel` (the update pass, after the rates) forms :math:`d` again and updates :math:`w`;
- :func:`momentum_update_kernel`: momentum SGD's direction :math:`d = g + \beta w`, its rate, the momentum buffer,
  the update of :math:`w` and the sum of squares of the step; :func:`plain_update_kernel` the same without momentum.

They are compiled horizontally fused, as torch compiles its own optimizers over lists: :func:`adam_direction_lists`,
:func:`adam_update_lists`, :func:`momentum_update_lists` and :func:`plain_update_lists` run a kernel on every layer of
a list, and Inductor compiles the unrolled loop into one graph (C++ on the CPU, Triton on the GPU), so a step makes
one compiled call per param group and pays Dynamo's guard check and the wrapper once for all its layers. Shapes are
dynamic; a graph is compiled once per list length, dtypes and size classes (Inductor's CPU reductions take another
accumulation above 4096 elements): in a training run once per param group and kernel. Learning rates, rates, step
counts and hyperparameters are tensor inputs, so changing them never recompiles. :func:`fused_kernels_available`
tells, once per device type, whether Inductor can compile there (a C++ compiler on the CPU, Triton on the GPU); where it
cannot, it logs one warning and :func:`select_ops` picks the foreach kernels instead.

On the CPU the same kernels run as C++ (``csrc/fused_cpu.cpp``, built by :mod:`hf_cblr.optim._cpu_kernels`) where every
tensor of a list is a contiguous fp32 or fp64 CPU tensor: Inductor does not put a reduction and the in-place stores of
the same elements in one loop, so its reduction pass reads the layer twice, where the C++ kernel reads it once. There
the fused path's norms are one C++ pass per tensor too (:meth:`FusedTensorListOps.norms`). Where the C++ kernels cannot
be built, Inductor's run (the reason logged at INFO: :mod:`hf_cblr.optim._cpu_kernels`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import Tensor

from hf_cblr.optim._cpu_kernels import cpu_kernels

logger = logging.getLogger(__name__)

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

    def fp64_dots(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
        r""":math:`\langle x, y \rangle` of every pair, summed in fp64 over fp64 products (exact products for fp32 and
        bf16 elements): the sums behind the momentum-SGD update norms on fragments, where :math:`|b|^2 - 2\langle b, d
        \rangle + |d|^2` cancels digits."""
        if not xs:
            return torch.zeros(0, dtype=torch.float64)
        return torch.stack([_fp64_dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys, strict=True)])

    def gather(self, xs: Sequence[Tensor], positions: Sequence[Tensor | None]) -> TensorList:
        """Each tensor's values at its flat ``positions`` (int64), as new 1-D tensors (a copy of all values where None):
        the element samples. ``index_select``: on the CPU about 3x faster than indexing with the positions (``x[p]``)."""
        return [x.reshape(-1).clone() if p is None else x.reshape(-1).index_select(0, p)
                for x, p in zip(xs, positions, strict=True)]

    def all_reduce_sum(self, vector: Tensor) -> Tensor:
        """``vector`` summed over the ranks that share the layers (in place); in one process, ``vector`` itself."""
        return vector

    def chunk_elements(self, tensors: Sequence[Tensor]) -> int | None:
        """The most elements the step takes through these kernels at once: :func:`chunk_elements`."""
        return chunk_elements(tensors)


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


#: Where each coefficient of :func:`adam_direction_kernel` sits in its ``coefficients`` vector.
ADAM_COEFFICIENTS = ("one_minus_beta1", "beta2", "one_minus_beta2", "eps", "weight", "quotient")
#: Where each coefficient of :func:`momentum_update_kernel` (and the first five of :func:`plain_update_kernel`) sits.
MOMENTUM_COEFFICIENTS = ("decay", "rate", "lr", "buffer", "direction", "step_direction", "step_buffer")


def _adam_moments_and_sums(grad: Tensor, weight: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
                           coefficients: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`adam_direction_kernel`'s work: the moments updated in place; returns the direction ``d`` (not stored) and
    the sums of squares of ``g, m, q, d, w``."""
    one_minus_beta1, beta2, one_minus_beta2, eps, weight_coefficient, quotient_coefficient = coefficients.unbind()
    exp_avg.lerp_(grad, one_minus_beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad * one_minus_beta2)
    quotient = exp_avg / (exp_avg_sq.sqrt() + eps)
    direction = weight_coefficient * weight + quotient_coefficient * quotient
    return direction, torch.stack([grad.square().sum(), exp_avg.square().sum(), quotient.square().sum(),
                                   direction.square().sum(), weight.square().sum()])


def adam_direction_kernel(grad: Tensor, weight: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, coefficients: Tensor) -> Tensor:
    r"""Adam's moments of one layer and the norms of its direction, in one pass (the reduction pass); returns the sums
    of squares of ``g, m, q, d, w``. The direction is not stored: :func:`adam_update_kernel` forms it again.

    With the coefficients :data:`ADAM_COEFFICIENTS` :math:`(1 - \beta_1, \beta_2, 1 - \beta_2, \epsilon', a, b)`:

    .. math::

        m \leftarrow m + (1 - \beta_1)(g - m),\quad v \leftarrow \beta_2 v + (1 - \beta_2)\, g^2,\quad
        q = \frac{m}{\sqrt v + \epsilon'},\quad d = a\, w + b\, q
    """
    return _adam_moments_and_sums(grad, weight, exp_avg, exp_avg_sq, coefficients)[1]


def adam_update_kernel(weight: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, coefficients: Tensor, factor: Tensor) -> None:
    r"""The update pass of one layer: :math:`w \leftarrow w - f\, d` with :math:`d = a\, w + b\, m / (\sqrt v + \epsilon')`
    formed again from the moments :func:`adam_direction_kernel` left (``coefficients``: its row; ``factor``:
    :math:`f = \eta\, r\, k`)."""
    eps, weight_coefficient, quotient_coefficient = coefficients[3:].unbind()
    weight.sub_(factor * (weight_coefficient * weight + quotient_coefficient * (exp_avg / (exp_avg_sq.sqrt() + eps))))


def adam_step_kernel(grad: Tensor, weight: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, coefficients: Tensor,
                     factor: Tensor) -> Tensor:
    r""":func:`adam_direction_kernel` and :func:`adam_update_kernel` in one pass, for rates known before it: the moments,
    :math:`w \leftarrow w - f\, d`, and the sums of squares of ``g, m, q, d, w`` (``w`` before the update)."""
    direction, sums = _adam_moments_and_sums(grad, weight, exp_avg, exp_avg_sq, coefficients)
    weight.sub_(factor * direction)
    return sums


def momentum_update_kernel(grad: Tensor, weight: Tensor, buffer: Tensor, coefficients: Tensor) -> Tensor:
    r"""Momentum SGD's update of one layer, in one pass; returns the sum of squares of the step :math:`s`.

    With the coefficients :data:`MOMENTUM_COEFFICIENTS` :math:`(\beta, r, \eta, \mu', \delta', \sigma_d, \sigma_b)`:

    .. math::

        d = r\,(g + \beta w),\quad b \leftarrow \mu' b + \delta' d,\quad s = \sigma_d\, d + \sigma_b\, b,\quad
        w \leftarrow w - \eta\, s

    (:math:`\mu' = \mu, \delta' = 1 - \text{dampening}`, or :math:`0, 1` on a layer's first step; :math:`\sigma_d,
    \sigma_b = 1, \mu` with Nesterov, else :math:`0, 1`).
    """
    decay, rate, lr, buffer_factor, direction_factor, step_direction, step_buffer = coefficients.unbind()
    direction = (grad + decay * weight) * rate
    buffer.mul_(buffer_factor).add_(direction * direction_factor)
    step = step_direction * direction + step_buffer * buffer
    weight.sub_(lr * step)
    return step.square().sum()


def plain_update_kernel(grad: Tensor, weight: Tensor, coefficients: Tensor) -> Tensor:
    r"""SGD without momentum, one layer in one pass: :math:`s = r\,(g + \beta w)`, :math:`w \leftarrow w - \eta\, s`;
    returns the sum of squares of :math:`s` (coefficients: the first three of :data:`MOMENTUM_COEFFICIENTS`)."""
    decay, rate, lr = coefficients[:3].unbind()
    step = (grad + decay * weight) * rate
    weight.sub_(lr * step)
    return step.square().sum()


def replace_kernel(previous: Tensor, current: Tensor) -> Tensor:
    r""":math:`\|p - c\|^2`, and :math:`p \leftarrow c`, in one pass: the secant's change of gradient and its copy of
    :math:`g_t` for the next step."""
    change = previous - current
    previous.copy_(current)
    return change.square().sum()


def adam_direction_lists(grads: TensorList, weights: TensorList, exp_avgs: TensorList, exp_avg_sqs: TensorList,
                         coefficients: Tensor) -> Tensor:
    """:func:`adam_direction_kernel` on every layer of a list, row ``i`` of ``coefficients`` (``[layers, 6]``) for
    layer ``i``; returns the ``[layers, 5]`` sums of squares. Compiled, the loop unrolls into one graph: one call runs
    every layer's pass."""
    return torch.stack([adam_direction_kernel(g, w, m, v, row) for g, w, m, v, row in
                        zip(grads, weights, exp_avgs, exp_avg_sqs, coefficients.unbind(), strict=True)])


def adam_update_lists(weights: TensorList, exp_avgs: TensorList, exp_avg_sqs: TensorList, coefficients: Tensor,
                      factors: Tensor) -> None:
    """:func:`adam_update_kernel` on every layer of a list (``coefficients``: ``[layers, 6]``, ``factors``: ``[layers]``)."""
    for w, m, v, row, factor in zip(weights, exp_avgs, exp_avg_sqs, coefficients.unbind(), factors.unbind(), strict=True):
        adam_update_kernel(w, m, v, row, factor)


def replace_lists(previous: TensorList, current: TensorList) -> Tensor:
    """:func:`replace_kernel` on every pair of a list; returns the ``[layers]`` sums of squares."""
    return torch.stack([replace_kernel(p, c) for p, c in zip(previous, current, strict=True)])


def adam_step_lists(grads: TensorList, weights: TensorList, exp_avgs: TensorList, exp_avg_sqs: TensorList,
                    coefficients: Tensor, factors: Tensor) -> Tensor:
    """:func:`adam_step_kernel` on every layer of a list; returns the ``[layers, 5]`` sums of squares."""
    return torch.stack([adam_step_kernel(g, w, m, v, row, factor) for g, w, m, v, row, factor in
                        zip(grads, weights, exp_avgs, exp_avg_sqs, coefficients.unbind(), factors.unbind(), strict=True)])


def momentum_update_lists(grads: TensorList, weights: TensorList, buffers: TensorList, coefficients: Tensor) -> Tensor:
    """:func:`momentum_update_kernel` on every layer of a list (``coefficients``: ``[layers, 7]``); returns the
    ``[layers]`` sums of squares of the steps."""
    return torch.stack([momentum_update_kernel(g, w, b, row)
                        for g, w, b, row in zip(grads, weights, buffers, coefficients.unbind(), strict=True)])


def plain_update_lists(grads: TensorList, weights: TensorList, coefficients: Tensor) -> Tensor:
    """:func:`plain_update_kernel` on every layer of a list (``coefficients``: ``[layers, 7]``)."""
    return torch.stack([plain_update_kernel(g, w, row) for g, w, row in zip(grads, weights, coefficients.unbind(), strict=True)])


@functools.cache
def compiled(kernel: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``kernel`` compiled by Inductor with dynamic shapes: on its first call for a list of layers, once per list
    length, dtypes and size classes (in a training run, once per param group)."""
    return torch.compile(kernel, dynamic=True, fullgraph=True)


def _probe(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum()


@functools.cache
def fused_kernels_available(device_type: str) -> bool:
    """Whether Inductor compiles and runs a kernel on ``device_type`` (probed once per process, on two tiny tensors).

    Where it cannot (no C++ compiler on the CPU, no Triton on the GPU) one warning is logged and the answer is False.
    """
    try:
        x = torch.ones(8, device=device_type)
        torch.compile(_probe, dynamic=True, fullgraph=True)(x, x)
    except Exception as error:  # any compile failure: the foreach kernels run instead
        logger.warning("fused=True: torch.compile cannot build kernels on %s here (%s: %s); the optimizer runs its "
                       "foreach kernels instead", device_type, type(error).__name__, str(error).splitlines()[0][:200])
        return False
    return True


class FusedTensorListOps(ForeachTensorListOps):
    """The foreach path, plus the bases' elementwise work as one call per list of layers (the kernels above).

    The bases call :meth:`adam_direction`, :meth:`adam_update`, :meth:`adam_step` and :meth:`momentum_update`, the secant
    :meth:`replace`, on a batch whose ``ops`` are these, with the whole param group's layers (:meth:`chunk_elements` is
    None: a chunk of another length would be another graph). Each runs the C++ kernels where :func:`_cpu_kernels_for`
    finds them, else the Inductor-compiled list kernel, which emits every layer's pass in one call (Triton kernels on
    the GPU), so the per-call cost (Dynamo's guards, the wrapper) is paid once per group, not once per layer. Their
    per-layer sums of squares are those of the tensors they get: on ZeRO fragments (``fused=True``) this rank's
    partial sums, which the bases take through the batch's :class:`~hf_cblr.optim.types.LayerSums` into the step's one
    all-reduce (on fragments the bases run the two-pass Adam step and momentum SGD's fragment update, whose norms come
    before the update).
    """

    def chunk_elements(self, tensors: Sequence[Tensor]) -> int | None:
        """None: the step takes each batch whole, one compiled call per list (see the class docstring)."""
        return None

    def norms(self, xs: Sequence[Tensor]) -> Tensor:
        """On the CPU one pass per tensor of the C++ kernels (torch's CPU norm runs at about half the memory bandwidth);
        elsewhere the foreach norms."""
        kernels = _cpu_kernels_for(xs)
        if kernels is None:
            return super().norms(xs)
        return kernels.sums_of_squares(list(xs)).sqrt_().to(xs[0].dtype)

    def fp64_dots(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
        """As the base class's; on the CPU the C++ kernel, which converts each element as it reads it instead of making
        fp64 copies of both tensors (about 6x the bytes of the pass)."""
        kernels = _cpu_kernels_for(xs, ys)
        if kernels is None:
            return super().fp64_dots(xs, ys)
        return kernels.fp64_dots(list(xs), list(ys))

    def gather(self, xs: Sequence[Tensor], positions: Sequence[Tensor | None]) -> TensorList:
        """As the base class's; on the CPU the C++ kernel, with the layers gathered in parallel (a sample's scattered
        reads are each a cache miss, and ``index_select`` takes them one layer at a time on one thread)."""
        sampled = [(x, p) for x, p in zip(xs, positions, strict=True) if p is not None]
        kernels = _cpu_kernels_for([x for x, _ in sampled])
        if kernels is None:
            return super().gather(xs, positions)
        gathered = iter(kernels.gather([x for x, _ in sampled], [p for _, p in sampled]))
        return [x.reshape(-1).clone() if p is None else next(gathered) for x, p in zip(xs, positions, strict=True)]

    def replace(self, previous: Sequence[Tensor], current: Sequence[Tensor]) -> tuple[Tensor, Tensor | None]:
        """:func:`replace_kernel` on every pair: the norms :math:`|p - c|`, and ``previous`` holding ``current``; with
        them the norms :math:`|c|` where the pass took them too (the C++ kernels, whose sums of squares are those of
        :meth:`norms`), else None. Inductor's kernel does not take :math:`|c|`: its float sum of :math:`c^2` differs
        from the foreach norm's by about 1e-7, which the denoised secants' noise subtraction amplifies past 1e-6."""
        if not previous:
            return torch.empty(0), None
        kernels = _cpu_kernels_for(previous, current)
        if kernels is None:
            return compiled(replace_lists)(_flats(previous), _flats(current)).sqrt_(), None
        changes, currents = kernels.replace_and_difference_squares(list(previous), list(current)).to(
            previous[0].dtype).sqrt_().unbind(1)
        return changes, currents

    def adam_direction(self, grads: Sequence[Tensor], weights: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                       exp_avg_sqs: Sequence[Tensor], coefficients: Tensor) -> Tensor:
        """:func:`adam_direction_kernel` on every layer, with the coefficient rows ``coefficients`` (``[layers, 6]``):
        the moments, and the ``[layers, 5]`` sums of squares of ``g, m, q, d, w``."""
        kernels = _cpu_kernels_for(grads, weights, exp_avgs, exp_avg_sqs)
        if kernels is not None:
            return kernels.adam_direction(list(grads), list(weights), list(exp_avgs), list(exp_avg_sqs),
                                          coefficients.double()).to(grads[0].dtype)
        return compiled(adam_direction_lists)(_flats(grads), _flats(weights), _flats(exp_avgs), _flats(exp_avg_sqs),
                                              coefficients)

    def adam_update(self, weights: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
                    coefficients: Tensor, factors: Tensor) -> None:
        """:func:`adam_update_kernel` on every layer: ``w -= f d``, with :meth:`adam_direction`'s ``coefficients`` and the
        per-layer ``factors`` ``f``."""
        kernels = _cpu_kernels_for(weights, exp_avgs, exp_avg_sqs)
        if kernels is not None:
            kernels.adam_update(list(weights), list(exp_avgs), list(exp_avg_sqs), coefficients.double(), factors.double())
        else:
            compiled(adam_update_lists)(_flats(weights), _flats(exp_avgs), _flats(exp_avg_sqs), coefficients, factors)

    def adam_step(self, grads: Sequence[Tensor], weights: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                  exp_avg_sqs: Sequence[Tensor], coefficients: Tensor, factors: Tensor) -> Tensor:
        """:func:`adam_step_kernel` on every layer: :meth:`adam_direction` and :meth:`adam_update` in one pass; returns
        the ``[layers, 5]`` sums of squares of ``g, m, q, d, w``."""
        kernels = _cpu_kernels_for(grads, weights, exp_avgs, exp_avg_sqs)
        if kernels is not None:
            return kernels.adam_step(list(grads), list(weights), list(exp_avgs), list(exp_avg_sqs), coefficients.double(),
                                     factors.double()).to(grads[0].dtype)
        return compiled(adam_step_lists)(_flats(grads), _flats(weights), _flats(exp_avgs), _flats(exp_avg_sqs),
                                         coefficients, factors)

    def momentum_update(self, grads: Sequence[Tensor], weights: Sequence[Tensor], buffers: Sequence[Tensor] | None,
                        coefficients: Tensor) -> Tensor:
        """:func:`momentum_update_kernel` on every layer (without ``buffers``:
        :func:`plain_update_kernel`), with the coefficient rows ``coefficients`` (``[layers, 7]``);
        returns the sums of squares of the steps."""
        kernels = _cpu_kernels_for(grads, weights, buffers or [])
        if kernels is not None:
            return kernels.momentum_update(list(grads), list(weights), list(buffers or []),
                                           coefficients.double()).to(grads[0].dtype)
        if buffers is None:
            return compiled(plain_update_lists)(_flats(grads), _flats(weights), coefficients)
        return compiled(momentum_update_lists)(_flats(grads), _flats(weights), _flats(buffers), coefficients)


def _cpu_kernels_for(*lists: Sequence[Tensor]) -> ModuleType | None:
    """The C++ kernels (:func:`~hf_cblr.optim._cpu_kernels.cpu_kernels`) where every tensor of ``lists`` is a contiguous
    CPU tensor of one dtype, fp32 or fp64, and they are built; else None (Inductor's kernels)."""
    tensors = [t for ts in lists for t in ts]
    if not tensors or tensors[0].dtype not in (torch.float32, torch.float64):
        return None
    dtype = tensors[0].dtype
    if not all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors):
        return None
    return cpu_kernels()


#: Elements per fp64 copy in :func:`_fp64_dot`: 2 MiB of fp64, so the copies stay in the cache.
FP64_DOT_CHUNK = 1 << 18


def _fp64_dot(x: Tensor, y: Tensor) -> Tensor:
    """``<x, y>`` of two 1-D tensors over fp64 copies of :data:`FP64_DOT_CHUNK` elements at a time (copies of the
    whole tensors would cost about 6x the bytes of the pass, and the memory)."""
    if x.numel() <= FP64_DOT_CHUNK:
        return torch.dot(x.double(), y.double())
    return torch.stack([torch.dot(a.double(), b.double())
                        for a, b in zip(x.split(FP64_DOT_CHUNK), y.split(FP64_DOT_CHUNK), strict=True)]).sum()


def _flats(tensors: Sequence[Tensor]) -> TensorList:
    """:func:`_flat` of every tensor."""
    return [_flat(tensor) for tensor in tensors]


def _flat(tensor: Tensor) -> Tensor:
    """A contiguous tensor as a 1-D tensor on its storage (one dynamic dimension whatever the layer's shape; detached,
    so not a view whose base's shape the compiled kernel would guard on); any other as it is."""
    return tensor.view(-1).detach() if tensor.is_contiguous() else tensor


SINGLE_TENSOR_OPS = TensorListOps()
FOREACH_OPS = ForeachTensorListOps()
FUSED_OPS = FusedTensorListOps()


def select_ops(foreach: bool | None, tensors: Sequence[Tensor], fused: bool | None = None) -> TensorListOps:
    """Pick the kernel path: the one place that does.

    ``fused=True`` picks the fused kernels where they run on the tensors' device: on the CPU the C++ kernels where they
    build, else (and off the CPU) Inductor's where it compiles; else, with one logged warning, as if ``fused=False``.
    They take whole layers and ZeRO fragments alike (on fragments their sums are partial, reduced over the ranks with
    the step's other sums). ``fused=None`` (the default) picks them, with ``foreach=None``, where they were measured
    faster than the foreach kernels (``docs/benchmarks.md``, "The fused step"): on contiguous fp32 or fp64 CPU tensors,
    where the C++ kernels build; elsewhere (the GPU, where they are not measured yet; bf16 parameters) it is
    ``fused=False``. DTensor shards (FSDP2) take ``fused=False``. Then ``foreach=None`` means foreach unless a tensor
    is sparse or on the meta device.
    """
    unsupported = any(t.is_sparse or t.device.type == "meta" for t in tensors)
    if fused is None:
        fused = foreach is None and not unsupported and _cpu_kernels_for(tensors) is not None
    if fused and tensors and not unsupported and fused_kernels_run_on(tensors[0].device.type):
        return FUSED_OPS
    if foreach is None:
        foreach = not unsupported
    return FOREACH_OPS if foreach else SINGLE_TENSOR_OPS


def fused_kernels_run_on(device_type: str) -> bool:
    """Whether the fused kernels run on ``device_type``: on the CPU the C++ kernels build, or (there too, where they do
    not) Inductor compiles."""
    return (device_type == "cpu" and cpu_kernels() is not None) or fused_kernels_available(device_type)
