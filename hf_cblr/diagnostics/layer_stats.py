r"""The optimizer's per-layer rate and curvature in the Trainer's logs, so that ``report_to`` integrations plot them.

An hf_cblr optimizer keeps, for every layer :math:`l`, the statistics of its last step (:meth:`CBLR.layer_stats`):
the smoothed curvature :math:`c_l` and the layer rate :math:`r_l` (the layer's learning rate is
:math:`\eta\, r_l`). :class:`LayerStatsCallback` adds them to every training log as the scalars

- ``layer_rate/<layer>``: :math:`r_l`;
- ``layer_curvature/<layer>``: :math:`c_l`;

with ``<layer>`` the model's parameter name, for the layers that have a layer rate (the adaptation mask: by default
the tensors with ``ndim > 1``; biases and norm scales keep :math:`r_l = 1`). transformers' ``TensorBoardCallback``
writes every scalar of a log with ``add_scalar``, so TensorBoard shows one ``layer_rate`` and one ``layer_curvature``
section; ``trainer.state.log_history`` (``trainer_state.json``) gets them too.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_cblr.integrations.transformers import find_optimizer
from hf_cblr.optim.param_groups import layer_ndim
from hf_cblr.optim.types import in_mask

#: The logged statistics and the prefix of their scalars.
LOGGED_STATS = {"rate": "layer_rate/", "curvature": "layer_curvature/"}


def optimizer_layer_stats(optimizer: Optimizer | None, model: nn.Module, *, adapted_only: bool = False
                          ) -> dict[str, dict[str, float]]:
    """Per layer ``curvature``, ``rate`` and ``lr = group lr * rate`` from one of this package's optimizers.

    ``optimizer`` may be wrapped (Accelerate, DeepSpeed); without an hf_cblr optimizer inside, the result is empty.
    The optimizer names its layers by the group's ``param_names`` or ``group{i}.{j}``; they are renamed to the
    model's parameter names where the parameter belongs to ``model``. ``adapted_only``: only the layers in their
    group's adaptation mask (those with a layer rate).
    """
    inner = find_optimizer(optimizer)
    if inner is None:
        return {}
    stats = inner.layer_stats()
    model_names = {id(param): name for name, param in model.named_parameters()}
    layers = {}
    for group in inner.param_groups:
        params = inner.layers_of(group)  # under DeepSpeed ZeRO the group holds a flat partition instead
        for key, param in zip(inner.layer_names_of(group), params, strict=True):
            if key not in stats or (adapted_only and not in_mask(group.get("adaptation_mask"), layer_ndim(param))):
                continue
            layer = stats[key]
            layers[model_names.get(id(param), key)] = {
                "curvature": layer["curvature"], "rate": layer["rate"], "lr": float(group["lr"]) * layer["rate"],
            }
    return layers


class LayerStatsCallback(TrainerCallback):
    """Add ``layer_rate/<layer>`` and ``layer_curvature/<layer>`` of the hf_cblr optimizer's last step to every
    training log (see the module docstring); nothing with another optimizer.

    The reporting integrations (``report_to``) are callbacks that the Trainer places before the ones given to it,
    and each writes a log when its turn comes: :meth:`attach` makes this callback the first, so that they write
    these scalars. ``CBLRTrainer`` (and ``CBLRSFTTrainer``) attach it whenever ``report_to`` is set; with another
    ``Trainer``::

        trainer = Trainer(model=model, args=args, optimizers=(hf_cblr.create_optimizer(model, "mclr_adam"), None))
        LayerStatsCallback().attach(trainer)
    """

    def attach(self, trainer: Trainer) -> LayerStatsCallback:
        """Make this the trainer's first callback, so that every reporting integration logs the per-layer scalars."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, optimizer: Optimizer | None = None, model: nn.Module | None = None,
               **kwargs: Any) -> None:
        if logs is None or "loss" not in logs or model is None:  # only training logs
            return
        scalars = {
            f"{prefix}{name}": stats[key]
            for name, stats in optimizer_layer_stats(optimizer, model, adapted_only=True).items()
            for key, prefix in LOGGED_STATS.items()
        }
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)  # Trainer.log appended a copy of the logs
