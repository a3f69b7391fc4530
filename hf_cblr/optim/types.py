"""The data of one optimizer step, and nothing else: the modules of :mod:`hf_cblr.optim` import these types, and
this module imports from the package only the leaf :mod:`hf_cblr.optim._tensor_ops` (the kernels), so the
optimizer, its estimators and its layer sources depend on it and not on each other.

- :class:`LayerBatch`: the layers of one param group that a step updates (whole layers, or under ZeRO their
  local fragments), in fp32, with their state dicts;
- :class:`LayerFragment`: the part of one layer that lives in a rank's flat partition;
- :class:`LayerSums`: the sums over each layer's elements that a step of a batch needs, reduced over the ranks at
  one point, in one all-reduce, where the layers are cut into fragments;
- :class:`StateKind`: how each per-layer state entry is shaped, which the optimizer and its estimator declare
  (``state_schema``) so that a layer source can store it without guessing from shapes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from itertools import chain, pairwise
from typing import Any

import torch
from torch import Tensor

from hf_cblr.optim._tensor_ops import TensorList, TensorListOps, compute_dtype

Closure = Callable[[], Tensor]


class StateKind(enum.Enum):
    """The shape of one entry of a layer's optimizer state."""

    #: one value per layer (a 0-d tensor): a step count, a curvature, a norm
    LAYER = "layer"
    #: one value per element of the layer (of its fragment under ZeRO): momentum, moments, a previous gradient
    ELEMENT = "element"
    #: a 1-D row of its own length per layer: the values at a layer's sampled elements
    ROW = "row"


def in_mask(mask: bool | None, ndim: int) -> bool:
    """Whether a layer of ``ndim`` dimensions is in a group's mask (None: the layers with ``ndim > 1``)."""
    return ndim > 1 if mask is None else mask


@dataclass(frozen=True)
class LayerFragment:
    """The part of one layer that lives in this rank's flat partition.

    Elements ``[layer_start, layer_start + length)`` of the flattened layer are elements
    ``[offset, offset + length)`` of the partition; ``length == 0`` when none lives here.
    """

    index: int  # the layer's position in its param group, as given to the optimizer
    shape: tuple[int, ...]
    offset: int
    layer_start: int
    length: int

    @property
    def layer_numel(self) -> int:
        """Elements of the whole layer."""
        return torch.Size(self.shape).numel()


def concat_per_layer(parts: list[Any]) -> Any:
    """One dataclass of per-layer results from the same dataclass computed on consecutive chunks of layers.

    Every field is per layer: tensors are concatenated, lists chained; a field that is None in the parts stays
    None, and a scalar must be the same in every part. A field of any other type is an error, never dropped.
    """
    if len(parts) == 1:
        return parts[0]
    values = {}
    for f in fields(parts[0]):
        items = [getattr(part, f.name) for part in parts]
        if all(item is None for item in items):
            values[f.name] = None
        elif all(isinstance(item, Tensor) for item in items):
            values[f.name] = torch.cat(items)
        elif all(isinstance(item, list) for item in items):
            values[f.name] = list(chain.from_iterable(items))
        elif all(isinstance(item, (int, float)) for item in items) and len(set(items)) == 1:
            values[f.name] = items[0]
        else:
            raise TypeError(f"{type(parts[0]).__name__}.{f.name} is not a per-layer field (tensor, list or None): "
                            f"cannot join its chunks")
    return type(parts[0])(**values)


class LayerSums:
    r"""The sums over each layer's elements that one step of a batch needs, reduced over the ranks in one all-reduce.

    The parts of the step (the estimator's :meth:`prepare` and :meth:`measure`, the base's :meth:`direction`) take
    the norms, inner products and gathered samples they need on the batch's local tensors, through :meth:`norms`,
    :meth:`dots` and :meth:`add`, and keep the tensors these return. On whole layers those are the values, and
    :meth:`reduce` has nothing to do. On fragments (ZeRO partitions, FSDP2 shards) they are this rank's partial sums
    until the step calls :meth:`reduce`, once, after every direction is formed: one all-reduce of their concatenation
    (norms as squares, :math:`|x|^2 = \sum_r |x_r|^2`) writes the sums over the whole layers back into them, in
    place. A part therefore reads them, and derives anything from them, only after the reduction: in
    :meth:`~hf_cblr.optim.estimators.CurvatureEstimator.estimate` and in the update (``docs/sharding.md``, "How many
    collectives").
    """

    def __init__(self, kernels: TensorListOps, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> None:
        #: the local kernels the sums are taken with
        self.kernels = kernels
        #: sums a vector over the ranks that share the layers, in place (None: whole layers, nothing to reduce)
        self.all_reduce_sum = all_reduce_sum
        self._pending: list[tuple[Tensor, bool]] = []
        self._taken: dict[int, Tensor] = {}

    def norms(self, xs: Sequence[Tensor]) -> Tensor:
        """The 2-norm of every tensor of ``xs`` (one vector); on fragments, after :meth:`reduce`. Where a kernel of its
        own took all of them earlier in the step (:meth:`add_norms` with ``of``), those, without another pass."""
        if xs and all(id(x) in self._taken for x in xs):
            return torch.stack([self._taken[id(x)] for x in xs])
        return self._register(self.kernels.norms(xs), is_norm=True)

    def add_norms(self, norms: Tensor, of: Sequence[Tensor] = ()) -> Tensor:
        """Norms a kernel of its own took (one per layer; on fragments this rank's partial norms), to be reduced as the
        norms of :meth:`norms` are; returns them. ``of``: on whole layers, the tensors they are the norms of, as they
        are until the update (gradients, weights), so that :meth:`norms` of them takes no other pass this step."""
        if of and self.all_reduce_sum is None:
            self._taken.update((id(x), norm) for x, norm in zip(of, norms.unbind(), strict=True))
        return self._register(norms, is_norm=True)

    def dots(self, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
        """The inner product of every pair of ``xs`` and ``ys`` (one vector); on fragments, after :meth:`reduce`."""
        return self._register(self.kernels.dot(xs, ys), is_norm=False)

    def add(self, partial: Tensor) -> Tensor:
        """``partial`` (any shape), to be summed over the ranks by :meth:`reduce`, in place; returns it."""
        return self._register(partial, is_norm=False)

    def reduce(self) -> None:
        """Sum every pending partial over the ranks, in one all-reduce; nothing on whole layers."""
        pending, self._pending = self._pending, []
        if self.all_reduce_sum is None or not pending:
            return
        flat = torch.cat([(value.square() if is_norm else value).reshape(-1) for value, is_norm in pending])
        self.all_reduce_sum(flat)
        for (value, is_norm), total in zip(pending, flat.split([value.numel() for value, _ in pending]), strict=True):
            value.copy_((total.sqrt() if is_norm else total).view(value.shape))

    def _register(self, value: Tensor, *, is_norm: bool) -> Tensor:
        if self.all_reduce_sum is not None and value.numel():
            self._pending.append((value, is_norm))
        return value


@dataclass
class LayerBatch:
    """The layers of one param group that have a gradient this step, in fp32 (fp64 layers in fp64): a step's inputs.

    Under DeepSpeed ZeRO ``params`` are 1-D fragments of the layers, described by ``fragments``
    (None: whole layers). ``decay`` is each layer's weight decay :math:`\\beta` (0 outside the weight decay mask),
    ``adapt`` whether it is in the adaptation mask. ``ops`` are the kernels the step runs on these layers (on
    fragments their ``norms`` and ``dot`` are summed over the ranks, one all-reduce per call, for parts outside the
    step's plan); ``sums`` takes the per-layer sums the step's parts need and reduces them once (:class:`LayerSums`).
    Nothing else writes into a batch: every part of the step returns its results (:class:`Direction`,
    :class:`Prelude`, estimates, rates).
    """

    group: dict[str, Any]
    params: list[Tensor]
    weights: TensorList
    grads: TensorList
    states: list[dict[str, Any]]
    names: list[str]
    layer_ids: list[int]
    decay: Tensor
    adapt: Tensor
    ops: TensorListOps
    sums: LayerSums
    fragments: list[LayerFragment] | None = None
    #: On fragments, :attr:`StateKind.ROW` state holds the whole layer's row on every rank (DTensor shards, whose
    #: checkpoints DCP reshards) instead of the fragment's part of it (ZeRO partitions).
    whole_layer_rows: bool = False

    def __len__(self) -> int:
        return len(self.params)

    def chunks(self, max_elements: int | None) -> list[LayerBatch]:
        """The batch as runs of consecutive whole layers of at most ``max_elements`` elements together (a
        larger layer is a run of its own), sharing its tensors; ``[self]`` when ``max_elements`` is None, or
        for ZeRO fragments, where every norm is an all-reduce.

        The step takes one chunk at a time through all its kernels (the whole step where a layer's rate is
        its own; else the direction, then, after the rates, the update), so that on the CPU each kernel finds
        the chunk's tensors still in the cache (``docs/algorithm.md``, "Numerics").
        """
        if max_elements is None or self.fragments is not None:
            return [self]
        bounds, elements = [0], 0
        for i, param in enumerate(self.params):
            if elements and elements + param.numel() > max_elements:
                bounds.append(i)
                elements = 0
            elements += param.numel()
        bounds.append(len(self))
        if len(bounds) == 2:
            return [self]
        return [self._slice(start, stop) for start, stop in pairwise(bounds)]

    def _slice(self, start: int, stop: int) -> LayerBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("params", "weights", "grads", "states", "names", "layer_ids", "decay", "adapt"):
            values[name] = values[name][start:stop]
        return LayerBatch(**values)

    def no_estimates(self) -> Tensor:
        """A vector of NaN, one per layer: no estimate yet."""
        return torch.full((len(self),), math.nan, device=self.decay.device)


@dataclass
class Direction:
    r"""What a base direction (:mod:`hf_cblr.optim.directions`) gives the rest of the step, per layer.

    The step of layer :math:`l` is :math:`-\eta\, r_l\, u_l` with :math:`u_l = k_l\, d_l`: ``tensors`` hold
    :math:`d_l` and ``scales`` the :math:`k_l` (None: all 1), so per-layer factors cost no pass over the layer.
    ``grad_norms`` are :math:`|g_l|` and ``tensor_norms`` :math:`|d_l|` where the base computes them (None: not
    computed), both from the batch's :class:`LayerSums` (read them after its reduction); :attr:`norms` is
    :math:`|u_l|`. Its methods are the base's preconditioner :math:`P` (the identity for momentum SGD), which the
    estimators apply without knowing which base they run on.
    """

    tensors: TensorList
    grad_norms: Tensor
    scales: Tensor | None = None
    tensor_norms: Tensor | None = None

    @property
    def norms(self) -> Tensor | None:
        """:math:`|u_l| = k_l |d_l|` (None where the base does not compute :math:`|d_l|`)."""
        if self.tensor_norms is None or self.scales is None:
            return self.tensor_norms
        return self.tensor_norms * self.scales.to(self.tensor_norms.device)

    def gains(self) -> Tensor | float:
        r"""The preconditioner's gain :math:`|P \hat m| / |\hat m|` per layer (1: the identity)."""
        return 1.0

    def trust_numerators(self, weight_norms: Tensor, decay: Tensor) -> Tensor:
        r"""The numerator of the trust ratio :math:`c_l = (\cdot) / |w_l|` of LARS (:math:`|g| + \beta |w|`) or
        LAMB (:math:`|u|`)."""
        return self.grad_norms + decay * weight_norms

    def precondition_(self, tensors: TensorList, ops: TensorListOps) -> None:
        """Apply :math:`P` to ``tensors`` (one per layer) in place."""

    def preconditioner_at(self, index: int, positions: Tensor | None) -> Tensor | float:
        """:math:`P` of layer ``index`` at the flat ``positions`` (all elements when None)."""
        return 1.0

    def precondition_rows_(self, rows: list[int], values: Tensor, sampled: Callable[[TensorList], Tensor]) -> None:
        """Divide ``values`` (a ``[len(rows), length]`` matrix of the layers ``rows`` at their sampled elements) by
        :math:`P^{-1}` at those elements; ``sampled`` turns per-layer tensors into such a matrix."""


@dataclass
class Prelude:
    """What an estimator measures before the direction is formed (:meth:`CurvatureEstimator.prepare`) and gets
    back in :meth:`~CurvatureEstimator.estimate` and :meth:`~CurvatureEstimator.finish`.

    ``workspace``: per layer, an fp32 buffer of the layer's (or fragment's) size that the estimator lends to the
    base direction for this step, so the direction needs no new tensor; None: none lent.
    """

    workspace: list[Tensor | None]


@dataclass
class EstimateInput:
    """One batch's inputs to an estimator: the layers, their direction, the estimator's own prelude, and
    :math:`|w_t - w_{t-1}|` of the last update per layer (0 before the first)."""

    batch: LayerBatch
    direction: Direction
    prelude: Prelude
    last_update_norms: Tensor


def layer_batch(group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], *,
                 names: list[str], layer_ids: list[int], ndims: list[int], ops: TensorListOps,
                 sums: LayerSums | None = None, fragments: list[LayerFragment] | None = None,
                 whole_layer_rows: bool = False) -> LayerBatch:
    """The batch of one group's layers: ``params`` are the layers, or under ZeRO their local ``fragments``
    (:mod:`hf_cblr.optim.partitioned`) or DTensor shards (:mod:`hf_cblr.optim.dtensor_layers`), whose layers have
    ``ndims`` dimensions (the masks' default); ``sums``: the step's sums, reduced over the ranks of the fragments
    (None: whole layers, :class:`LayerSums` of ``ops`` with nothing to reduce); ``whole_layer_rows``: see
    :attr:`LayerBatch.whole_layer_rows`."""
    device = params[0].device
    vector_dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    return LayerBatch(
        group=group,
        params=params,
        weights=[p if p.dtype == compute_dtype(p) else p.to(compute_dtype(p)) for p in params],
        grads=[g if g.dtype == compute_dtype(p) else g.to(compute_dtype(p)) for p, g in zip(params, grads, strict=True)],
        states=states,
        names=names,
        layer_ids=layer_ids,
        decay=torch.tensor([group["weight_decay"] if in_mask(group["weight_decay_mask"], n) else 0.0 for n in ndims],
                           device=device, dtype=vector_dtype),
        adapt=torch.tensor([in_mask(group["adaptation_mask"], n) for n in ndims], device=device),
        ops=ops,
        sums=LayerSums(ops) if sums is None else sums,
        fragments=fragments,
        whole_layer_rows=whole_layer_rows,
    )

