"""Build param groups by parameter name, with the two independent masks (weight decay, adaptation).

As in optax's ``lars``, weight decay and the layer-wise rate have separate masks. By default
biases and norm-layer parameters (and every tensor with ``ndim <= 1``) get neither.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from torch import Tensor, nn

#: Name fragments that mark a parameter as a bias or a normalization parameter.
DEFAULT_EXCLUDED_NAMES: tuple[str, ...] = ("bias", "LayerNorm", "layernorm", "layer_norm", "norm.", "ln_")


def layer_ndim(param: Tensor) -> int:
    """Dimensions of the layer: of its ``ds_shape`` under DeepSpeed ZeRO-3, whose ``zero.Init`` (which
    transformers uses to build a model under ZeRO-3) leaves every parameter a placeholder of shape ``[0]``."""
    return len(getattr(param, "ds_shape", param.shape))


def layer_names(group: dict[str, Any], index: int) -> list[str]:
    """The names of the layers of the optimizer's ``index``-th param group: its ``param_names`` (named parameters or
    :func:`param_groups`), else ``group<index>.<position>``. The optimizer's statistics, its ZeRO layer source and the
    probes name layers by it."""
    return list(group.get("param_names") or [f"group{index}.{j}" for j in range(len(group["params"]))])


def _excluded(name: str, param: nn.Parameter, patterns: Sequence[str]) -> bool:
    return layer_ndim(param) <= 1 or any(pattern in name for pattern in patterns)


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.0,
    *,
    no_weight_decay: Sequence[str] = DEFAULT_EXCLUDED_NAMES,
    no_adaptation: Sequence[str] = DEFAULT_EXCLUDED_NAMES,
    decayed: Collection[str] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Named param groups of ``model``'s trainable parameters, split by the two masks.

    A parameter is left out of weight decay (of the curvature rate) when it is 1-D or its name
    contains one of ``no_weight_decay`` (``no_adaptation``). Each group carries explicit
    ``weight_decay_mask``/``adaptation_mask`` booleans, ``weight_decay``, and ``group_options``;
    empty groups are omitted. Pass the result to any optimizer of this package. ``decayed``: the names of the
    parameters that get weight decay, instead of ``no_weight_decay`` (``CBLRTrainer`` passes the Trainer's).
    """
    groups: dict[tuple[bool, bool], list[tuple[str, nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            decay = name in decayed if decayed is not None else not _excluded(name, param, no_weight_decay)
            key = (decay, not _excluded(name, param, no_adaptation))
            groups.setdefault(key, []).append((name, param))
    return [
        {"params": members, "weight_decay": weight_decay if decay else 0.0, "weight_decay_mask": decay,
         "adaptation_mask": adapt, **group_options}
        for (decay, adapt), members in sorted(groups.items(), reverse=True)
    ]
