"""``curvature="secant_denoised"``: the secant with the gradient's sampling noise taken out (the default of CBLR)."""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor

from hf_cblr._distributed import world_size as data_parallel_world_size
from hf_cblr.optim._tensor_ops import compute_dtype
from hf_cblr.optim.estimators.base import nan_where, register_curvature_estimator
from hf_cblr.optim.estimators.secant import SecantCurvature, SecantPrelude
from hf_cblr.optim.types import Closure, EstimateInput, LayerBatch, StateKind


@dataclass
class DenoisedSecantPrelude(SecantPrelude):
    """The gradient's noise variance as a fraction of ``|g|^2`` per layer, NaN where unknown."""

    grad_noise_fractions: Tensor


class _MicroBatchNorms:
    """One parameter's squared gradient norms over the backward passes of the current step."""

    __slots__ = ("__weakref__", "count", "last", "pending", "total")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pending: Tensor | None = None
        self.total: Tensor | float = 0.0  # sum over backward passes of |h_k|^2
        self.last: Tensor | float = 0.0  # |sum_k h_k|^2: .grad after the last pass
        self.count = 0


@register_curvature_estimator
class DenoisedSecantCurvature(SecantCurvature):
    r"""The secant with the gradient noise taken out of :math:`\|g_t - g_{t-1}\|^2`:

    .. math::

        c = p\, \frac{\sqrt{\|g_t - g_{t-1}\|^2 - V_t - V_{t-1}}}{\|w_t - w_{t-1}\|} + \beta,
        \qquad V = \|g\|^2\, \frac{M \rho - 1}{M - 1},\quad
        \rho = \frac{\sum_k \|h_k\|^2}{\|\sum_k h_k\|^2}

    where :math:`h_1 .. h_M` are what the step's :math:`M` backward passes (its accumulated micro-batches)
    added to the layer's ``.grad``. Two mini-batch gradients differ by the curvature along the step *and*
    by sampling noise: :math:`E\|g_t - g_{t-1}\|^2 = \|\bar g_t - \bar g_{t-1}\|^2 + V_t + V_{t-1}` with
    :math:`V = E\|g - \bar g\|^2`. With i.i.d. micro-batches :math:`V` is estimated without bias from their
    spread (``docs/algorithm.md`` §4, ``secant_denoised``). Where what is left does not exceed the noise
    :math:`V_t + V_{t-1}` the layer has no estimate this step (its smoothed curvature is kept). The plain
    secant divides noise by the step length, so its curvature grows as the rates shrink and the rates
    collapse; this one does not.

    The norms come from hooks on the parameters (``register_hook`` for each pass's :math:`h_k`,
    ``register_post_accumulate_grad_hook`` for ``.grad``): a pass counts only when it accumulates into
    ``.grad``, so ``torch.autograd.grad`` calls (closures, probes) do not. :math:`\rho` is a ratio, so loss
    scaling and gradient clipping between backward and step change nothing. A step needs at least two
    backward passes (gradient accumulation); with one the layer has no estimate. Under data parallelism
    the ranks pool their sums (:meth:`prepare`); not supported on DeepSpeed ZeRO partitions.
    """

    name = "secant_denoised"
    supports_partitions = False
    state_schema: ClassVar[dict[str, StateKind]] = {**SecantCurvature.state_schema, "grad_noise": StateKind.LAYER}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._norms: dict[int, _MicroBatchNorms] = {}
        self._warned = False

    def watch(self, params: list[Tensor]) -> None:
        for param in params:
            if param.requires_grad and id(param) not in self._norms:
                norms = self._norms[id(param)] = _MicroBatchNorms()
                # Weak references: once the optimizer is gone, its hooks do nothing.
                param.register_hook(partial(_record_pass, weakref.ref(norms)))
                param.register_post_accumulate_grad_hook(partial(_commit_pass, weakref.ref(norms)))

    def prepare(self, batch: LayerBatch) -> DenoisedSecantPrelude:
        r"""The secant's prelude, with the noise fractions :math:`V / \|g\|^2` of the batch's layers (NaN: unknown).

        Under data parallelism (``torch.distributed`` initialized, more than one rank) the hooks see a rank's
        own passes; the ranks average their sums :math:`\sum_k \|h_k\|^2` and :math:`\|a\|^2 = \|\sum_k h_k\|^2`
        (one all-reduce), so every rank computes the same rates. With :math:`W` ranks, each rank's gradient has
        the noise :math:`V_r` of one process, the averaged gradient :math:`V_r / W`, and
        :math:`E\|a\|^2 = \|\bar g\|^2 + V_r` while :math:`E\|g\|^2 = \|\bar g\|^2 + V_r / W`:
        the fraction is :math:`(V_r / W) / (\overline{\|a\|^2} - V_r (1 - 1/W))`.
        """
        secant = super().prepare(batch)
        norms = [self._norms.get(id(param)) for param in batch.params]
        counts = torch.tensor([0 if entry is None else entry.count for entry in norms], dtype=torch.float32)
        sums = torch.zeros(len(norms), 2, dtype=torch.float32, device=batch.decay.device)
        for i, entry in enumerate(norms):
            if entry is not None and entry.count >= 2:
                sums[i, 0], sums[i, 1] = entry.total, entry.last
        world_size = data_parallel_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(sums)
            sums /= world_size
        totals, lasts = sums.unbind(1)
        counts = counts.to(sums.device)
        local_noise = (counts * totals - lasts) / (counts - 1)  # V_r, in the units of the hooks' gradients
        global_norms = lasts - local_noise * (1 - 1 / world_size)  # |g|^2 in those units
        fractions = (local_noise / world_size / global_norms).clamp(min=0)
        noise_fractions = torch.where((counts >= 2) & (global_norms > 0), fractions, math.nan)
        single_pass = bool((counts == 1).any())
        for entry in norms:
            if entry is not None:
                entry.reset()
        if single_pass and not self._warned:
            self._warned = True
            warnings.warn(
                "curvature='secant_denoised' saw a step with one backward pass: it measures the gradient noise from two or "
                "more (gradient accumulation, micro-batches) and makes no estimate otherwise, so such layers step at rate 1 "
                "(the base optimizer at lr). Accumulate two or more micro-batches per step, or choose another curvature",
                stacklevel=2,
            )
        return DenoisedSecantPrelude(secant.workspace, secant.continuing, secant.continuing_norms, noise_fractions,
                                     holds_current=secant.holds_current)

    def estimate(self, inputs: list[EstimateInput], closure: Closure | None, step: int) -> list[Tensor]:
        return [self._secants(x, *self._denoised_signal(x)) for x in inputs]

    def _secants(self, x: EstimateInput, signal: Tensor, noise: Tensor) -> Tensor:
        """This step's secants, NaN where the signal does not exceed the noise."""
        step_norms = x.last_update_norms
        secants = x.direction.gains() * signal.clamp(min=0).sqrt() / step_norms + x.batch.decay
        return nan_where(secants, (step_norms == 0) | ~(signal > noise))

    @staticmethod
    def _denoised_signal(x: EstimateInput) -> tuple[Tensor, Tensor]:
        r"""Per layer: the signal :math:`\|g_t - g_{t-1}\|^2 - V_t - V_{t-1}` (NaN where a noise is unknown), the
        noise :math:`V_t + V_{t-1}`; keeps :math:`V_t` for the next step."""
        batch, prelude = x.batch, x.prelude
        noise = prelude.grad_noise_fractions * x.direction.grad_norms.square()
        previous = torch.stack([state.get("grad_noise", torch.tensor(math.nan, device=noise.device))
                                for state in batch.states])
        signal = prelude.grad_change_norms.square() - noise - previous
        for state, value, known in zip(batch.states, noise, noise.isfinite().tolist(), strict=True):
            if known:
                state["grad_noise"] = value.clone()
            else:
                state.pop("grad_noise", None)
        return signal, noise + previous


def _record_pass(reference: weakref.ref[_MicroBatchNorms], grad: Tensor) -> None:
    norms = reference()
    if norms is not None:
        norms.pending = torch.linalg.vector_norm(grad.detach(), dtype=compute_dtype(grad)).square()


def _commit_pass(reference: weakref.ref[_MicroBatchNorms], param: Tensor) -> None:
    norms = reference()
    if norms is not None and norms.pending is not None and param.grad is not None:
        norms.total = norms.total + norms.pending
        norms.last = torch.linalg.vector_norm(param.grad.detach(), dtype=compute_dtype(param.grad)).square()
        norms.count += 1
        norms.pending = None
