"""The data of one optimizer step, and nothing else: the modules of :mod:`hf_cblr.optim` import these types, and
this module imports from the package only the leaf :mod:`hf_cblr.optim._tensor_ops` (the kernels), so the
optimizer, its estimators and its layer sources depend on it and not on each other.

- :class:`LayerBatch`: the layers of one param group that a step updates (whole layers, or under ZeRO their
  local fragments), in fp32, with their state dicts;
- :class:`LayerFragment`: the part of one layer that lives in a rank's flat partition;
- :class:`StateKind`: how each per-layer state entry is shaped, which the optimizer and its estimator declare
  (``state_schema``) so that a layer source can store it without guessing from shapes.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from itertools import chain, pairwise
from typing import Any

import torch
from torch import Tensor

from hf_cblr.optim._tensor_ops import TensorList, TensorListOps

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


#: ``LayerBatch`` field metadata: one entry per layer (sliced by :meth:`LayerBatch.chunks`) ...
PER_LAYER = {"per_layer": True}
#: ... and computed by the step per chunk (joined back by :meth:`LayerBatch.join`).
PER_LAYER_RESULT = {"per_layer": True, "result": True}


@dataclass
class LayerBatch:
    r"""The layers of one param group that have a gradient this step, in fp32.

    ``direction`` is the base optimizer's direction before the layer rate: ``g + beta w`` for the
    SGD base; for the Adam base ``u = m_hat / (sqrt(v_hat) + eps) + beta w`` up to a factor per layer,
    :math:`u_l = k_l\, d_l` with ``direction`` holding :math:`d_l` and ``direction_scales`` the :math:`k_l`
    (so the bias corrections and the weight decay's factor cost no pass over the layer; see
    ``CBLR._adam_direction``). ``direction_norms`` are the norms :math:`|u_l|`, computed once (through
    ``ops``, so reduced over ranks under ZeRO) for every user.
    The Adam preconditioner :math:`P = 1 / (\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon)` is kept as
    its parts, ``second_moments`` :math:`v` and ``inverse_sqrt_bias_corrections2``, and formed where used.
    Under DeepSpeed ZeRO ``params`` are 1-D fragments of the layers, described by ``fragments``
    (None: whole layers).
    """

    group: dict[str, Any]
    params: list[Tensor] = field(metadata=PER_LAYER)
    weights: TensorList = field(metadata=PER_LAYER)
    grads: TensorList = field(metadata=PER_LAYER)
    states: list[dict[str, Any]] = field(metadata=PER_LAYER)
    names: list[str] = field(metadata=PER_LAYER)
    layer_ids: list[int] = field(metadata=PER_LAYER)
    decay: Tensor = field(metadata=PER_LAYER)
    adapt: Tensor = field(metadata=PER_LAYER)
    ops: TensorListOps
    direction: TensorList = field(default_factory=list, metadata=PER_LAYER_RESULT)
    #: Adam base: :math:`k_l` with :math:`u_l = k_l` ``direction[l]``; None for the SGD base (all 1).
    direction_scales: Tensor | None = field(default=None, metadata=PER_LAYER_RESULT)
    #: Adam base: :math:`|u_l|`.
    direction_norms: Tensor = field(default_factory=lambda: torch.empty(0), metadata=PER_LAYER_RESULT)
    #: Adam base: ``v`` (None for the SGD base, whose preconditioner is the identity).
    second_moments: TensorList | None = field(default=None, metadata=PER_LAYER_RESULT)
    #: Adam base: :math:`1 / \sqrt{1 - \beta_2^{t_l}}` per layer.
    inverse_sqrt_bias_corrections2: list[float] = field(default_factory=list, metadata=PER_LAYER_RESULT)
    grad_norms: Tensor = field(default_factory=lambda: torch.empty(0), metadata=PER_LAYER_RESULT)
    #: Adam base: ``|P m_hat| / |m_hat|`` per layer, the preconditioner's gain along the momentum.
    preconditioner_gains: Tensor = field(default_factory=lambda: torch.empty(0), metadata=PER_LAYER_RESULT)
    fragments: list[LayerFragment] | None = field(default=None, metadata=PER_LAYER)
    #: Per layer, an fp32 buffer of the layer's (or fragment's) size that the estimator lends to this step
    #: (:meth:`CurvatureEstimator.before_direction`), so the direction needs no new tensor; None: none lent.
    workspace: list[Tensor | None] = field(default_factory=list, metadata=PER_LAYER_RESULT)
    #: Secant estimators: ``|g_t - g_{t-1}|`` per layer, NaN where there is no previous gradient.
    grad_change_norms: Tensor = field(default_factory=lambda: torch.empty(0), metadata=PER_LAYER_RESULT)
    #: Denoised secant: the gradient's noise variance as a fraction of ``|g|^2`` per layer, NaN where unknown.
    grad_noise_fractions: Tensor = field(default_factory=lambda: torch.empty(0), metadata=PER_LAYER_RESULT)

    def __post_init__(self) -> None:
        if not self.workspace:
            self.workspace = [None] * len(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def chunks(self, max_elements: int | None) -> list[LayerBatch]:
        """The batch as runs of consecutive whole layers of at most ``max_elements`` elements together (a
        larger layer is a run of its own), sharing its tensors; ``[self]`` when ``max_elements`` is None, or
        for ZeRO fragments, where every norm is an all-reduce.

        The step takes one chunk at a time through all its kernels (the whole step where a layer's rate is
        its own; else the direction, then, after the rates, the update), so that on the CPU each kernel finds
        the chunk's tensors still in the cache (``docs/algorithm.md``, "Numerics"). A chunk holds slices of
        this batch's per-layer fields, results included.
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
        for f in fields(self):
            if f.metadata.get("per_layer") and values[f.name] is not None:
                values[f.name] = values[f.name][start:stop]
        return LayerBatch(**values)

    def join(self, chunks: list[LayerBatch]) -> None:
        """Take as this batch's the per-layer results that its ``chunks`` (from :meth:`chunks`) computed."""
        if len(chunks) == 1 and chunks[0] is self:
            return
        for f in fields(self):
            parts = [getattr(chunk, f.name) for chunk in chunks]
            if f.metadata.get("result") and parts[0] is not None:
                setattr(self, f.name, torch.cat(parts) if isinstance(parts[0], Tensor) else list(chain.from_iterable(parts)))

    def no_estimates(self) -> Tensor:
        """A vector of NaN, one per layer: no estimate yet."""
        return torch.full((len(self),), math.nan, device=self.decay.device)

    def precondition_(self, tensors: TensorList) -> None:
        """Apply Adam's preconditioner ``P`` in place (the identity for the SGD base)."""
        if self.second_moments is not None:
            self.ops.div_(tensors, self.ops.adam_denominators(
                self.second_moments, self.inverse_sqrt_bias_corrections2, self.group["eps"]))

    def preconditioner_at(self, index: int, positions: Tensor | None) -> Tensor | float:
        """``P`` of layer ``index`` at the flat ``positions`` (all elements when None)."""
        if self.second_moments is None:
            return 1.0
        second_moment = self.second_moments[index].reshape(-1)
        second_moment = second_moment if positions is None else second_moment[positions]
        return 1.0 / (second_moment.sqrt() * self.inverse_sqrt_bias_corrections2[index] + self.group["eps"])


def layer_batch(group: dict[str, Any], params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]], *,
                 names: list[str], layer_ids: list[int], ndims: list[int], ops: TensorListOps,
                 fragments: list[LayerFragment] | None = None) -> LayerBatch:
    """The batch of one group's layers: ``params`` are the layers, or under ZeRO their local ``fragments``
    (:mod:`hf_cblr.optim.partitioned`), whose layers have ``ndims`` dimensions (the masks' default)."""
    device = params[0].device
    return LayerBatch(
        group=group,
        params=params,
        weights=[p if p.dtype == torch.float32 else p.float() for p in params],
        grads=[g if g.dtype == torch.float32 else g.float() for g in grads],
        states=states,
        names=names,
        layer_ids=layer_ids,
        decay=torch.tensor([group["weight_decay"] if in_mask(group["weight_decay_mask"], n) else 0.0 for n in ndims],
                           device=device),
        adapt=torch.tensor([in_mask(group["adaptation_mask"], n) for n in ndims], device=device),
        ops=ops,
        fragments=fragments,
    )

