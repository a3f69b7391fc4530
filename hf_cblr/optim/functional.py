r"""The CBLR step as one function of explicit inputs: layer batches in, parameters and state updated, statistics out.

.. math::

    c_l &\leftarrow \alpha\, c_l + (1 - \alpha)\, \hat c_l
        \quad\text{(EMA of the estimator's } \hat c_l\text{; kept when } \hat c_l \text{ is not finite or } \le 0)\\
    r_l &= \operatorname{clamp}\big(\tau\, c_{\text{ref}} / (c_l + \epsilon_c),\ r_{\min},\ r_{\max}\big),\qquad
    w_l \leftarrow w_l - \eta\, r_l\, u_l

A step composes three parts (:class:`StepParts`), each a small object with a declared interface:

- the **base direction** :math:`u_l` (:mod:`hf_cblr.optim.directions`: momentum SGD, Adam), which also applies the
  update;
- the **curvature estimator** :math:`\hat c_l` (:mod:`hf_cblr.optim.estimators`);
- the **rate rule** :math:`c_{\text{ref}}` (:mod:`hf_cblr.optim.rates`: 1 for CBLR, LARS and LAMB; the median
  curvature for MCLR).

Data flows one way. Per chunk of layers (:meth:`~hf_cblr.optim.types.LayerBatch.chunks`), the estimator's
:meth:`prepare` returns its :class:`~hf_cblr.optim.types.Prelude` (with buffers it lends), the base forms the
:class:`~hf_cblr.optim.types.Direction` in them, and the estimator's :meth:`measure` adds what needs the direction.
Each takes the sums over layer elements it needs through the batch's :class:`~hf_cblr.optim.types.LayerSums`, which
are then reduced at one point (on fragments: one all-reduce per batch and step, ``docs/sharding.md``). The estimator
gets the prelude and direction back with the last update's norms and returns estimates; this function smooths them
into the layer's curvature; the rule returns the rates; the base applies the update and returns its norms, which this
function keeps for the next step; the estimator's :meth:`finish` closes the step. The per-layer state entries this
function owns are ``step``, ``curvature`` and ``update_norm`` (:data:`CORE_STATE_SCHEMA`); each part declares its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hf_cblr.optim._tensor_ops import compute_dtype
from hf_cblr.optim.directions import BaseDirection
from hf_cblr.optim.estimators import CurvatureEstimator
from hf_cblr.optim.rates import RateRule
from hf_cblr.optim.types import Closure, Direction, EstimateInput, LayerBatch, Prelude, StateKind, concat_per_layer

#: The per-layer state of the step itself: the step count, the smoothed curvature (0: no estimate yet; valid
#: estimates are > 0) and :math:`|w_t - w_{t-1}|` of the last update.
CORE_STATE_SCHEMA = {"step": StateKind.LAYER, "curvature": StateKind.LAYER, "update_norm": StateKind.LAYER}


@dataclass(frozen=True)
class StepParts:
    """The composition of a step: base direction x curvature estimator x rate rule."""

    direction: BaseDirection
    estimator: CurvatureEstimator
    rate_rule: RateRule

    @property
    def state_schema(self) -> dict[str, StateKind]:
        """The kind of every entry of a layer's state: the step's own and each part's."""
        return {**CORE_STATE_SCHEMA, **self.direction.state_schema, **self.estimator.state_schema}

    def new_state(self, param: Tensor) -> dict[str, Tensor]:
        """A fresh state for layer (or ZeRO fragment) ``param``."""
        zero = torch.zeros((), dtype=compute_dtype(param), device=param.device)
        return {key: zero.clone() for key in CORE_STATE_SCHEMA} | self.direction.new_state(param)


@dataclass
class LayerStats:
    """Per-layer vectors of one chunk of a step, for diagnostics (``CBLR.layer_stats``)."""

    names: list[str]
    vectors: dict[str, Tensor]


def cblr_step(batches: list[LayerBatch], parts: StepParts, *, step: int, closure: Closure | None,
              estimate: bool) -> tuple[Tensor | None, list[LayerStats]]:
    """One step of ``batches`` (their step counters already advanced to ``step``): estimates (when ``estimate``),
    rates and updates. Returns the loss of the estimator's last closure call (None without one) and the statistics.

    Where a layer's rate is its own (the rule does not need all layers, no closure), the whole step runs one chunk
    at a time, its tensors still in the cache; else all directions first, then the estimates and rates, then the
    updates, chunk by chunk (``docs/algorithm.md``, "Numerics").
    """
    if parts.rate_rule.needs_all_layers or parts.estimator.needs_closure:
        return _step_together(batches, parts, step, closure, estimate)
    stats: list[LayerStats] = []
    for batch in batches:
        for chunk in batch.chunks(batch.ops.chunk_elements(batch.params)):
            stats += _step_together([chunk], parts, step, None, estimate)[1]
    return None, stats


def _step_together(batches: list[LayerBatch], parts: StepParts, step: int, closure: Closure | None,
                   estimate: bool) -> tuple[Tensor | None, list[LayerStats]]:
    estimator, base = parts.estimator, parts.direction
    prepared: list[tuple[list[LayerBatch], list[Prelude], list[Direction]]] = []
    for batch in batches:
        chunks = batch.chunks(batch.ops.chunk_elements(batch.params))
        preludes, directions = [], []
        for chunk in chunks:
            prelude = estimator.prepare(chunk)
            steps = _stacked(chunk, "step").tolist() if base.needs_step_counts else None
            direction = base.direction(chunk, prelude.workspace, steps, gains=estimator.needs_preconditioner_gains,
                                       norms_before_update=estimate and estimator.reads_direction_norms)
            directions.append(direction)
            preludes.append(estimator.measure(chunk, direction, prelude) if estimate else prelude)
        batch.sums.reduce()  # on fragments: every sum of the batch's step, in one all-reduce
        prepared.append((chunks, preludes, directions))
    loss = None
    if estimate:
        losses: list[Tensor] = []
        inputs = [EstimateInput(batch, concat_per_layer(directions), concat_per_layer(preludes), _stacked(batch, "update_norm"))
                  for batch, (_, preludes, directions) in zip(batches, prepared, strict=True)]
        estimates = estimator.estimate(inputs, _recording(closure, losses), step)
        loss = losses[-1] if losses else None
        for batch, batch_estimates in zip(batches, estimates, strict=True):
            _smooth_curvature(batch, batch_estimates, 0.0 if estimator.smoothed else batch.group["curvature_ema"])
    curvatures = [_stacked(batch, "curvature") for batch in batches]
    stats = []
    for rates, curvature, (chunks, preludes, directions) in zip(parts.rate_rule.rates(batches, curvatures), curvatures,
                                                                prepared, strict=True):
        start = 0
        for chunk, prelude, direction in zip(chunks, preludes, directions, strict=True):
            chunk_rates = rates[start:start + len(chunk)]
            update_norms = base.update(chunk, direction, chunk_rates)
            _write_back(chunk, update_norms)
            stats.append(LayerStats(chunk.names, {"curvature": curvature[start:start + len(chunk)], "rate": chunk_rates,
                                                  "update_norm": update_norms, "grad_norm": direction.grad_norms}))
            estimator.finish(chunk, prelude)
            start += len(chunk)
    return loss, stats


def _stacked(batch: LayerBatch, key: str) -> Tensor:
    """The per-layer state scalar ``key`` of the batch's layers, as one vector."""
    return torch.stack([state[key] for state in batch.states])


def _smooth_curvature(batch: LayerBatch, estimate: Tensor, ema: float) -> None:
    """EMA of valid estimates; the first valid estimate is taken as is; invalid ones keep the old value."""
    previous = _stacked(batch, "curvature")
    smoothed = torch.where(previous > 0, ema * previous + (1 - ema) * estimate, estimate)
    valid = torch.isfinite(estimate) & (estimate > 0)
    batch.ops.copy_([state["curvature"] for state in batch.states], list(torch.where(valid, smoothed, previous).unbind()))


def _write_back(batch: LayerBatch, update_norms: Tensor) -> None:
    """Copy the fp32 weights into parameters of lower precision, and keep the update's norms for the next step."""
    low_precision = [i for i, (p, w) in enumerate(zip(batch.params, batch.weights, strict=True)) if p is not w]
    batch.ops.copy_([batch.params[i] for i in low_precision], [batch.weights[i] for i in low_precision])
    batch.ops.copy_([state["update_norm"] for state in batch.states], list(update_norms.unbind()))


def _recording(closure: Closure | None, losses: list[Tensor]) -> Closure | None:
    """Wrap ``closure`` so the loss of its last call can be returned from ``step``."""
    if closure is None:
        return None

    def recorded() -> Tensor:
        losses.append(closure())
        return losses[-1]

    return recorded

