"""``curvature="secant_elementwise"``: per-element secants over a fixed sample of each layer (MCLR's default)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from hf_cblr.optim._tensor_ops import TensorList
from hf_cblr.optim.estimators.base import CurvatureEstimator, register_curvature_estimator
from hf_cblr.optim.types import Closure, Direction, EstimateInput, LayerBatch, Prelude, StateKind

#: Elements whose weight change is below this fraction of the layer's mean |dw| carry no secant
#: information and are ignored by the element-wise estimators.
NEGLIGIBLE_STEP_FRACTION = 1e-3


class FragmentSample(NamedTuple):
    """The part of a layer's element sample that lies in one fragment of the layer (under ZeRO)."""

    #: places in the layer's sample (``0 <= slot < size``) of the positions in the fragment
    slots: Tensor
    #: those positions, relative to the fragment's first element
    local: Tensor
    #: elements in the layer's whole sample: ``min(numel, sample_size)``
    size: int


@dataclass
class SamplePrelude(Prelude):
    """On fragments: this rank's part of the batch's samples (:meth:`ElementwiseSecantCurvature.measure`), from the
    batch's sums: the whole samples once they are reduced."""

    samples: Tensor


@register_curvature_estimator
class ElementwiseSecantCurvature(CurvatureEstimator):
    """Per-element secants ``|P_i dg_i| / |dw_i|``, aggregated over the layer's element sample.

    Keeps the previous gradient and weight at the sampled positions only (``sample_size`` values
    each); elements whose ``|dw_i|`` is negligible are ignored. Layers of similar sample length are
    computed together: their samples are padded with NaN into one ``[layers, length]`` matrix (lengths
    within a factor 2, so padding at most doubles it), and NaN (padding, or an element that did not
    move) is left out of the row's mean or median. On ZeRO fragments and DTensor shards the sample is the
    one of the whole layer, and the estimates are those of one process (:meth:`_estimate_on_fragments`,
    :meth:`_estimate_on_shards`).
    """

    name = "secant_elementwise"
    elementwise = True
    reads_direction_norms = False
    state_schema: ClassVar[dict[str, StateKind]] = {
        "sample_prev_grad": StateKind.ROW, "sample_prev_weight": StateKind.ROW, "sample_positions": StateKind.ROW}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fragment_samples: dict[tuple[int, int, int], FragmentSample] = {}

    def measure(self, batch: LayerBatch, direction: Direction, prelude: Prelude) -> Prelude:
        """On fragments: this rank's part of the layers' samples, summed over the ranks with the step's other sums
        (:meth:`_fragment_changes`, :meth:`_shard_samples`); on whole layers nothing."""
        if batch.fragments is None:
            return prelude
        partial = self._shard_samples(batch, direction) if batch.whole_layer_rows else self._fragment_changes(batch, direction)
        return SamplePrelude(prelude.workspace, batch.sums.add(partial))

    def estimate(self, inputs: list[EstimateInput], closure: Closure | None, step: int) -> list[Tensor]:
        estimates = []
        for x in inputs:
            if x.batch.fragments is None:
                estimates.append(self._estimate(x.batch, x.direction))
                continue
            assert isinstance(x.prelude, SamplePrelude)
            estimates.append(self._estimate_on_shards(x.batch, x.prelude.samples) if x.batch.whole_layer_rows
                             else self._estimate_on_fragments(x.batch, x.prelude.samples))
        return estimates

    def _estimate(self, batch: LayerBatch, direction: Direction) -> Tensor:
        """One process, whole layers: the layers of similar sample length as one padded matrix."""
        positions = [self._sample_positions(batch, i) for i in range(len(batch))]
        grads = batch.ops.gather(batch.grads, positions)
        weights = batch.ops.gather(batch.weights, positions)
        estimate = batch.no_estimates()
        known = [i for i, state in enumerate(batch.states) if "sample_prev_grad" in state]
        for rows in _similar_lengths(known, [grads[i].numel() for i in known]):
            grad_changes, steps = self._changes(batch, direction, rows, [positions[i] for i in rows],
                                                [grads[i] for i in rows], [weights[i] for i in rows])
            estimate[rows] = (self._row_estimates(grad_changes, steps) + batch.decay[rows]).to(estimate.dtype)
        for state, grad, weight in zip(batch.states, grads, weights, strict=True):
            state["sample_prev_grad"] = grad
            state["sample_prev_weight"] = weight
        return estimate

    def _row_estimates(self, grad_changes: Tensor, steps: Tensor) -> Tensor:
        """Per row of :meth:`_changes`: ``agg_i(P_i |dg_i| / |dw_i|)`` over the elements that moved (NaN where none)."""
        curvatures = torch.where(moved_elements(steps), grad_changes / steps, math.nan)
        return curvatures.nanmedian(dim=1).values if self.aggregate == "median" else curvatures.nanmean(dim=1)

    def _secant(self, grad_change: Tensor, weight_change: Tensor) -> Tensor:
        """``agg_i(P_i |dg_i| / |dw_i|)`` over the sampled elements with ``|dw_i| > 10^-3 mean_j |dw_j|``."""
        moved = weight_change > NEGLIGIBLE_STEP_FRACTION * weight_change.mean()
        return self._aggregate(grad_change[moved] / weight_change[moved])

    def _fragment_changes(self, batch: LayerBatch, direction: Direction) -> Tensor:
        r"""This rank's part of the element changes of every sampled layer, for :meth:`_estimate_on_fragments`.

        The rank keeps the previous gradient and weight at the sampled positions of its fragments only.
        It writes :math:`P_i |\Delta g_i|` and :math:`|\Delta w_i|` of those positions, at their slots in
        their layer's sample, into one zero vector ``[P|dg| of sample 1, |dw| of sample 1, P|dg| of
        sample 2, ...]`` of the batch's layers that have a previous sample (the same layers on every rank: they all
        started at the partition's first step). Every sampled position lies in exactly one rank's fragment, so once
        summed over the ranks each entry is ``x + 0 + ... + 0 = x``.
        """
        samples = [self._fragment_sample(batch, i) for i in range(len(batch))]
        continuing = [i for i, state in enumerate(batch.states) if "sample_prev_grad" in state]
        offsets = _offsets([2 * samples[i].size for i in continuing])
        measured = torch.zeros(offsets[-1], dtype=torch.float32, device=batch.decay.device)
        for i, offset in zip(continuing, offsets, strict=False):
            slots, local, size = samples[i]
            state = batch.states[i]
            grad_change = (batch.grads[i][local] - state["sample_prev_grad"]).abs_() * direction.preconditioner_at(i, local)
            measured[offset + slots] = grad_change
            measured[offset + size + slots] = (batch.weights[i][local] - state["sample_prev_weight"]).abs_()
        return measured

    def _estimate_on_fragments(self, batch: LayerBatch, measured: Tensor) -> Tensor:
        r"""The estimates of the whole layers from the changes :meth:`_fragment_changes` wrote, summed over the ranks:
        every rank holds the samples one process measures, in the same order, and aggregates them as one process
        does (per layer here; :meth:`_estimate` batches the layers and divides instead of multiplying by the
        preconditioner's reciprocal, so the two differ by rounding, about 1e-7 relative). Then the rank keeps its
        fragments' part of the samples.
        """
        estimate = batch.no_estimates()
        samples = [self._fragment_sample(batch, i) for i in range(len(batch))]
        continuing = [i for i, state in enumerate(batch.states) if "sample_prev_grad" in state]
        for i, offset in zip(continuing, _offsets([2 * samples[i].size for i in continuing]), strict=False):
            size = samples[i].size
            grad_change, weight_change = measured[offset: offset + 2 * size].split(size)
            estimate[i] = self._secant(grad_change, weight_change) + batch.decay[i]
        for i, state in enumerate(batch.states):
            state["sample_prev_grad"] = batch.grads[i][samples[i].local]
            state["sample_prev_weight"] = batch.weights[i][samples[i].local]
        return estimate

    def _shard_samples(self, batch: LayerBatch, direction: Direction) -> Tensor:
        r"""This rank's part of the whole samples of every layer, for :meth:`_estimate_on_shards` (DTensor shards).

        Each rank writes :math:`g_i`, :math:`w_i` and :math:`P_i` of the sampled positions in its fragment, at their
        slots in their layer's sample, into one zero vector ``[g of sample 1, w of sample 1, P of sample 1, g of
        sample 2, ...]`` of all the batch's layers; summed over the ranks (each entry ``x + 0 + ... + 0 = x``) it gives
        every rank the whole samples one process sees. Costs :math:`3 \sum_l \min(n_l, \text{sample\_size})` values
        per step (the fragment path: 2).
        """
        samples = [self._fragment_sample(batch, i) for i in range(len(batch))]
        offsets = _offsets([3 * sample.size for sample in samples])
        gathered = torch.zeros(offsets[-1], dtype=torch.float32, device=batch.decay.device)
        for i, ((slots, local, size), offset) in enumerate(zip(samples, offsets, strict=False)):
            gathered[offset + slots] = batch.grads[i][local]
            gathered[offset + size + slots] = batch.weights[i][local]
            gathered[offset + 2 * size + slots] = direction.preconditioner_at(i, local)
        return gathered

    def _estimate_on_shards(self, batch: LayerBatch, gathered: Tensor) -> Tensor:
        """The estimates from the whole samples :meth:`_shard_samples` wrote, summed over the ranks, as
        :meth:`_estimate_on_fragments`; every rank keeps them as the layer's previous sample. The rows are then the
        same on every rank and do not depend on the world size, so a checkpoint of them can be loaded at another one."""
        estimate = batch.no_estimates()
        sizes = [self._fragment_sample(batch, i).size for i in range(len(batch))]
        for i, (size, offset) in enumerate(zip(sizes, _offsets([3 * size for size in sizes]), strict=False)):
            grad, weight, preconditioner = gathered[offset: offset + 3 * size].split(size)
            state = batch.states[i]
            if "sample_prev_grad" in state:
                estimate[i] = self._secant((grad - state["sample_prev_grad"]).abs_() * preconditioner,
                                           (weight - state["sample_prev_weight"]).abs_()) + batch.decay[i]
            state["sample_prev_grad"] = grad.clone()
            state["sample_prev_weight"] = weight.clone()
        return estimate

    def _fragment_sample(self, batch: LayerBatch, index: int) -> FragmentSample:
        """The part of layer ``index``'s sample in its fragment: the whole layer's sample of one process
        (:meth:`_draw_positions`, or all elements when ``numel <= sample_size``). Drawn once per process and
        kept here, not in the optimizer state: it is a function of the seed, the layer and the fragment."""
        assert batch.fragments is not None
        fragment = batch.fragments[index]
        key = (batch.layer_ids[index], fragment.layer_start, fragment.length)
        if key not in self._fragment_samples:
            numel = fragment.layer_numel
            if self.sample_size is None or numel <= self.sample_size:
                positions = torch.arange(numel)
            else:
                positions = self._draw_positions(numel, batch.layer_ids[index])
            slots = ((positions >= fragment.layer_start) & (positions < fragment.layer_start + fragment.length)).nonzero()[:, 0]
            device = batch.params[index].device
            self._fragment_samples[key] = FragmentSample(
                slots.to(device), (positions[slots] - fragment.layer_start).to(device), positions.numel())
        return self._fragment_samples[key]

    @staticmethod
    def _changes(batch: LayerBatch, direction: Direction, rows: list[int], positions: list[Tensor | None],
                 grads: TensorList, weights: TensorList) -> tuple[Tensor, Tensor]:
        """``[len(rows), length]`` matrices of ``P_i |dg_i|`` and ``|dw_i|`` at the sampled elements of the layers
        ``rows``, NaN in the padding."""
        grad_change = (_padded(grads) - _padded([batch.states[i]["sample_prev_grad"] for i in rows])).abs_()
        # the preconditioner may read the gradients at the samples too (the one-pass Adam step forms v from them):
        # those are gathered already
        gathered = {id(batch.grads[i]): sample for i, sample in zip(rows, grads, strict=True)}

        def sampled(tensors: TensorList) -> Tensor:
            missing = [(t, p) for t, p in zip(tensors, positions, strict=True) if id(t) not in gathered]
            gathered.update(zip((id(t) for t, _ in missing),
                                batch.ops.gather([t for t, _ in missing], [p for _, p in missing]), strict=True))
            return _padded([gathered[id(t)] for t in tensors])

        direction.precondition_rows_(rows, grad_change, sampled)
        steps = (_padded(weights) - _padded([batch.states[i]["sample_prev_weight"] for i in rows])).abs_()
        return grad_change, steps


def moved_elements(steps: Tensor) -> Tensor:
    """Per row of a ``[layers, length]`` matrix of ``|dw_i|`` (NaN padding): the elements whose step is not negligible,
    ``|dw_i| > 10^-3 mean_j |dw_j|`` (:data:`NEGLIGIBLE_STEP_FRACTION`); the others carry no secant information."""
    return steps > NEGLIGIBLE_STEP_FRACTION * steps.nanmean(dim=1, keepdim=True)


def _offsets(lengths: list[int]) -> list[int]:
    """Where each of consecutive runs of ``lengths`` starts, then where the last ends (``len(lengths) + 1`` values)."""
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return offsets


def _similar_lengths(indices: list[int], lengths: list[int]) -> list[list[int]]:
    """``indices`` grouped by length, within a factor 2: by ``ceil(log2(length))``."""
    groups: dict[int, list[int]] = {}
    for index, length in zip(indices, lengths, strict=True):
        groups.setdefault((length - 1).bit_length(), []).append(index)
    return list(groups.values())


def _padded(samples: TensorList) -> Tensor:
    """The 1-D ``samples`` as the rows of one matrix, padded with NaN to the longest (at least one column:
    the row of a layer without elements is NaN, no estimate)."""
    padded = torch.nn.utils.rnn.pad_sequence(samples, batch_first=True, padding_value=math.nan)
    return padded if padded.shape[1] else padded.new_full((len(samples), 1), math.nan)
