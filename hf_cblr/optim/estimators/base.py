"""The estimator interface, its registry and the pieces estimators share.

An estimator looks at the layers of the optimizer (grouped in :class:`~hf_cblr.optim.types.LayerBatch` es, one per
param group, all in fp32) *before* the step is applied, and returns one raw estimate per layer, NaN where it has none.
The optimizer then smooths the estimates with an EMA (unless the estimator's are already averages, ``smoothed``), keeps
the previous value wherever a new one is not finite or not positive, and turns them into layer rates (a rate rule,
:mod:`hf_cblr.optim.rates`). All estimators report the curvature of the *regularized* objective, so they add the
layer's weight decay ``beta`` (the Hessian of ``beta/2 |w|^2`` is ``beta I``).

With the Adam base the curvature is measured in Adam's preconditioned geometry, ``P = 1 / (sqrt(v_hat) + eps)``: the
iteration ``w <- w - lr r P g`` is governed by the spectrum of ``P H``, so every estimator measures ``P H`` instead of
``H``, through the methods of the step's :class:`~hf_cblr.optim.types.Direction` (the identity for momentum SGD); no
estimator knows which base it runs on. See ``docs/algorithm.md``.

A step calls, per batch of layers: :meth:`CurvatureEstimator.prepare` (before the direction; it may lend buffers),
:meth:`~CurvatureEstimator.measure` (after it), then, once the batch's sums are reduced
(:class:`~hf_cblr.optim.types.LayerSums`), :meth:`~CurvatureEstimator.estimate` with every batch's
:class:`~hf_cblr.optim.types.EstimateInput`, then, once the update is applied, :meth:`~CurvatureEstimator.finish`.
An estimator takes the sums over a layer's elements it needs in :meth:`prepare` or :meth:`measure`, through
``batch.sums``, and reads them in :meth:`estimate`: on fragments all of them are then reduced in one all-reduce.
Add an estimator with one file: subclass :class:`CurvatureEstimator` and decorate it with
:func:`register_curvature_estimator` (``docs/architecture.md``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from hf_cblr._registry import Registry
from hf_cblr.optim.types import Closure, Direction, EstimateInput, LayerBatch, Prelude, StateKind

AGGREGATES = ("mean", "median")


class CurvatureEstimator:
    """Base class. ``estimate`` returns, per batch, a vector of raw curvatures (NaN: no estimate)."""

    name: ClassVar[str]
    #: Needs ``step(closure)``: the closure re-evaluates the loss of the batch whose gradient is in
    #: ``.grad`` and returns it, without calling backward.
    needs_closure: ClassVar[bool] = False
    #: Estimates from per-element curvatures, aggregated by ``aggregate`` over a fixed sample.
    elementwise: ClassVar[bool] = False
    #: The kind of each entry the estimator keeps in a layer's state (ZeRO stores them by it).
    state_schema: ClassVar[dict[str, StateKind]] = {}
    #: Reads :meth:`Direction.gains` (the Adam base then computes them).
    needs_preconditioner_gains: ClassVar[bool] = False
    #: Reads the direction's norms or tensors before the update; False: only its preconditioner at sampled elements
    #: (the fused Adam kernels then take the step in one pass).
    reads_direction_norms: ClassVar[bool] = True
    #: Runs on DeepSpeed ZeRO's flat partitions.
    supports_partitions: ClassVar[bool] = True
    #: Its estimates are already averages over steps: the optimizer takes them as they are (no ``curvature_ema``).
    smoothed: ClassVar[bool] = False

    def __init__(self, *, aggregate: str = "mean", sample_size: int | None = 4096, seed: int = 0,
                 fd_step: float = 1e-3) -> None:
        self.aggregate = aggregate
        self.sample_size = sample_size
        self.seed = seed
        self.fd_step = fd_step

    def watch(self, params: list[Tensor]) -> None:
        """Called with the parameters of every param group as it is added: an estimator may hook them here."""

    def prepare(self, batch: LayerBatch) -> Prelude:
        """Called with each batch before the base direction is formed: measure here what the estimator keeps from
        the last step, and lend buffers to the direction (``Prelude.workspace``). The prelude comes back in
        :meth:`measure`, :meth:`estimate` and :meth:`finish`."""
        return Prelude([None] * len(batch))

    def measure(self, batch: LayerBatch, direction: Direction, prelude: Prelude) -> Prelude:
        """Called with each batch once its direction is formed, on the steps that estimate: take here the sums that
        need the direction (``batch.sums``; read them in :meth:`estimate`). Returns the prelude that
        :meth:`estimate` gets (``prelude`` itself when there is nothing to add)."""
        return prelude

    def estimate(self, inputs: list[EstimateInput], closure: Closure | None, step: int) -> list[Tensor]:
        raise NotImplementedError

    def finish(self, batch: LayerBatch, prelude: Prelude) -> None:
        """Called with each batch once its update is applied: the lent workspace is free again."""

    # -- shared pieces -------------------------------------------------------------------------
    def _aggregate(self, values: Tensor) -> Tensor:
        if values.numel() == 0:
            return torch.tensor(math.nan, device=values.device)
        if self.aggregate == "median":
            return values.median()
        return values.mean()

    def _sample_positions(self, batch: LayerBatch, index: int) -> Tensor | None:
        """The fixed element sample of a layer, drawn once from ``(seed, layer id)`` and kept in its state."""
        state = batch.states[index]
        numel = batch.params[index].numel()
        if self.sample_size is None or numel <= self.sample_size:
            return None
        if "sample_positions" not in state:
            state["sample_positions"] = self._draw_positions(numel, batch.layer_ids[index]).to(batch.params[index].device)
        return state["sample_positions"]

    def _draw_positions(self, numel: int, layer_id: int) -> Tensor:
        """``sample_size`` distinct flat positions of a layer of ``numel > sample_size`` elements, sorted,
        from the generator seeded with ``(seed, layer id)``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer_id)
        return torch.randperm(numel, generator=generator)[: self.sample_size].sort().values


#: The estimators by name; ``@register_curvature_estimator`` makes a class selectable as ``curvature=cls.name``.
CURVATURE_ESTIMATORS: Registry[CurvatureEstimator] = Registry("curvature")
register_curvature_estimator = CURVATURE_ESTIMATORS.register
create_curvature_estimator = CURVATURE_ESTIMATORS.create


def nan_where(values: Tensor, invalid: Tensor) -> Tensor:
    return torch.where(invalid, torch.full_like(values, math.nan), values)


def require_closure(name: str, closure: Closure | None) -> Closure:
    if closure is None:
        raise TypeError(
            f"curvature={name!r} needs a closure: call optimizer.step(closure) with a closure that "
            "re-evaluates the loss on the batch whose gradient is in .grad and returns it without "
            "calling backward; or choose a curvature that needs none: 'secant', 'secant_elementwise', "
            "'weight_norm'"
        )
    return closure
