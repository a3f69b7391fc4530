"""The base-direction interface, its registry, and the pieces bases share."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from hf_cblr._registry import Registry
from hf_cblr.optim.types import Direction, LayerBatch, StateKind


class BaseDirection:
    """Base class of the base directions."""

    name: ClassVar[str]
    #: The kind of each entry the base keeps in a layer's state.
    state_schema: ClassVar[dict[str, StateKind]] = {}
    #: Reads the layers' step counts (Adam's bias corrections).
    needs_step_counts: ClassVar[bool] = False

    def new_state(self, param: Tensor) -> dict[str, Any]:
        """The state the base keeps for a new layer (or ZeRO fragment) ``param``, before its first step."""
        return {}

    def direction(self, batch: LayerBatch, workspace: list[Tensor | None], steps: list[float] | None, *,
                  gains: bool, norms_before_update: bool = True) -> Direction:
        """The direction of ``batch``'s layers, which the caller lends the buffers ``workspace`` (None: none);
        ``steps``: the layers' step counts (when :attr:`needs_step_counts`); ``gains``: compute the
        preconditioner's gains (:meth:`Direction.gains`); ``norms_before_update`` False: the step reads nothing of
        the direction before :meth:`update` but its preconditioner at sampled elements, so a base may take the
        direction's norms in the update's own pass (the fused Adam kernels: one pass instead of two)."""
        raise NotImplementedError

    def update(self, batch: LayerBatch, direction: Direction, rates: Tensor) -> Tensor:
        """Apply the update with the layer ``rates`` to ``batch.weights``; returns :math:`|w_{t+1} - w_t|` per layer."""
        raise NotImplementedError


#: The bases by name; ``@register_direction`` makes a class selectable as ``base=cls.name``.
DIRECTIONS: Registry[BaseDirection] = Registry("base")
register_direction = DIRECTIONS.register
create_direction = DIRECTIONS.create


def plus_decay(batch: LayerBatch, direction: list[Tensor], workspace: list[Tensor | None]) -> list[Tensor]:
    """``direction`` with ``beta w`` added to its decayed layers (in ``workspace``, or new tensors)."""
    beta = batch.group["weight_decay"]
    decayed = [i for i, value in enumerate(batch.decay.tolist()) if value != 0]
    if beta == 0 or not decayed:
        return direction
    targets = [direction[i] for i in decayed]
    weights = [batch.weights[i] for i in decayed]
    outs = [workspace[i] for i in decayed]
    for i, new in zip(decayed, batch.ops.add(targets, weights, alpha=beta, outs=outs), strict=True):
        direction[i] = new
    return direction
