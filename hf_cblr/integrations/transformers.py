"""Use the optimizers of this package from a plain ``transformers.Trainer``, and check that they are what trains.

``optimizer_cls_and_kwargs`` builds the pair that ``Trainer(optimizer_cls_and_kwargs=...)`` takes; the
Trainer then creates the optimizer itself, with its decay/no-decay param groups, also on the DeepSpeed
path (where an optimizer *instance* passed as ``Trainer(optimizers=...)`` is silently replaced by one
built from ``args.optim``, transformers#38753). The layer-rate (adaptation) mask of those groups is the
optimizers' default: tensors with ``ndim > 1``, so biases and norm scales get neither decay nor a rate.

``optim_args`` syntax (:func:`parse_optim_args`): comma-separated ``key=value`` pairs; spaces around
keys, values and commas are ignored. Each value is typed, in this order:

==================  ===============================================  =========================
value               becomes                                          example
==================  ===============================================  =========================
``true``/``false``  ``bool`` (any case)                              ``nesterov=true``
``none``            ``None`` (any case)                              ``sample_size=none``
integer             ``int`` (``_`` separators allowed)               ``update_interval=10``
number              ``float`` (``1e-3``, ``inf``, ``-inf``)          ``trust=0.02``
``a:b[:c...]``      ``tuple`` of the typed parts                     ``betas=0.9:0.999``
anything else       ``str``                                          ``curvature=hvp``
==================  ===============================================  =========================

Under ZeRO-Offload, Accelerate replaces every client optimizer by ``DeepSpeedCPUAdam`` unless the
DeepSpeed config sets ``"zero_force_ds_cpu_optimizer": false`` (accelerate#2169);
:func:`prepare_deepspeed_config` sets it (or stops, naming the flag, where the config forces the
replacement). :func:`find_optimizer` / :func:`check_optimizer_in_use` look through the wrappers
(Accelerate, DeepSpeed engine and ZeRO optimizers) for the optimizer that actually steps, and
:class:`OptimizerCheckCallback` runs that check when training starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from torch.optim import Optimizer
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_cblr.optim.cblr import CBLR
from hf_cblr.optim.registry import get_optimizer_info, list_optimizers

OptimArgValue = bool | int | float | str | None | tuple[Any, ...]

#: ``optim_args`` keys that CBLRTrainingArguments takes from their own fields instead.
TRAINING_ARGUMENT_KEYS = {"lr": "learning_rate", "weight_decay": "weight_decay"}

_INTEGER = re.compile(r"[+-]?\d+(_\d+)*")


def parse_optim_value(text: str) -> OptimArgValue:
    """Type one ``optim_args`` value: bool, None, int, float, ``a:b`` tuple, else the string itself."""
    text = text.strip()
    if ":" in text:
        return tuple(parse_optim_value(part) for part in text.split(":"))
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if _INTEGER.fullmatch(text):
        return int(text)
    try:
        number = float(text)
    except ValueError:
        return text
    if math.isnan(number):
        raise ValueError("the value is NaN; give a number")
    return number


def parse_optim_args(optim_args: str | None) -> dict[str, OptimArgValue]:
    """Parse ``"k=v,k2=v2"`` into typed keyword arguments (syntax in the module docstring).

    Raises ``ValueError`` naming the offending item on a pair without ``=``, an empty key or a key
    given twice.
    """
    if optim_args is None or not optim_args.strip():
        return {}
    parsed: dict[str, OptimArgValue] = {}
    for item in optim_args.split(","):
        key, separator, value = item.partition("=")
        key = key.strip()
        if not separator or not key or not value.strip():
            raise ValueError(f"optim_args item {item.strip()!r} is not of the form key=value (in optim_args={optim_args!r})")
        if key in parsed:
            raise ValueError(f"optim_args gives {key!r} twice (in optim_args={optim_args!r})")
        try:
            parsed[key] = parse_optim_value(value)
        except ValueError as error:
            raise ValueError(f"optim_args {key}={value.strip()}: {error} (in optim_args={optim_args!r})") from None
    return parsed


def check_optimizer_arguments(name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``name`` is registered and ``kwargs`` are valid names *and* values.

    The values are checked by the optimizer's typed settings (:meth:`hf_cblr.optim.OptimInfo.config`), so a bad
    ``trust=-1`` fails here, not at the first training step.
    """
    if name not in list_optimizers():
        raise ValueError(f"optim={name!r} is not an optimizer of hf_cblr; valid values: {list_optimizers()}")
    try:
        get_optimizer_info(name).config(**kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"optim_args for optim={name!r}: {error}") from error


def optimizer_cls_and_kwargs(
    name: str, optim_args: str | Mapping[str, Any] | None = None, *, training_args: TrainingArguments | None = None
) -> tuple[type[Optimizer], dict[str, Any]]:
    """The ``(optimizer class, kwargs)`` pair of registry optimizer ``name`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The Trainer calls ``cls(param_groups, **kwargs)`` with its decay/no-decay groups, whose
    ``weight_decay`` comes from ``args.weight_decay``. Its ``learning_rate`` is *not* passed by the
    Trainer on this path: give ``training_args`` to take ``lr`` from ``args.learning_rate`` (and, for
    the Adam-base optimizers, ``betas``/``eps`` from ``adam_beta1``/``adam_beta2``/``adam_epsilon``),
    or put ``lr`` in ``optim_args``; otherwise the class default applies. ``optim_args`` (a string,
    see :func:`parse_optim_args`, or a mapping) wins over both.

    Example::

        args = TrainingArguments(output_dir="out", learning_rate=0.02, weight_decay=0.01)
        trainer = Trainer(model, args, train_dataset=train,
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs("mclr", "trust=0.5", training_args=args))
    """
    if name not in list_optimizers():
        raise ValueError(f"optimizer name {name!r} is not registered; valid values: {list_optimizers()}")
    info = get_optimizer_info(name)
    valid = info.valid_kwargs()
    kwargs: dict[str, Any] = {}
    if training_args is not None:
        from_args = {"lr": training_args.learning_rate, "betas": (training_args.adam_beta1, training_args.adam_beta2),
                     "eps": training_args.adam_epsilon}
        kwargs.update({key: value for key, value in from_args.items() if key in valid and (key == "lr" or info.base == "adam")})
    kwargs.update(parse_optim_args(optim_args) if optim_args is None or isinstance(optim_args, str) else optim_args)
    check_optimizer_arguments(name, kwargs)
    return info.optimizer_class, info.arguments(**kwargs)


# -- what trains ------------------------------------------------------------------------------------
def find_optimizer(obj: Any, cls: type[Optimizer] = CBLR) -> Optimizer | None:
    """The ``cls`` instance inside ``obj`` (a Trainer, an Accelerate/DeepSpeed wrapper or an optimizer), or None.

    Follows ``.optimizer`` links: ``Trainer.optimizer`` -> ``AcceleratedOptimizer`` /
    ``DeepSpeedOptimizerWrapper`` -> ZeRO optimizer -> the optimizer that computes the update.
    """
    seen: set[int] = set()
    while obj is not None and id(obj) not in seen:
        if isinstance(obj, cls):
            return obj
        seen.add(id(obj))
        obj = getattr(obj, "optimizer", None)
    return None


def innermost_optimizer(obj: Any) -> Any:
    """The optimizer that computes the update inside ``obj`` (the end of its ``.optimizer`` links), whatever its class."""
    seen: set[int] = set()
    while getattr(obj, "optimizer", None) is not None and id(obj) not in seen:
        seen.add(id(obj))
        obj = obj.optimizer
    return obj


def check_optimizer_in_use(obj: Any, cls: type[Optimizer] = CBLR) -> Optimizer:
    """Return the ``cls`` optimizer that steps inside ``obj``; raise ``RuntimeError`` saying what replaced it."""
    found = find_optimizer(obj, cls)
    if found is not None:
        return found
    innermost = innermost_optimizer(obj)
    message = f"the optimizer in use is {type(innermost).__module__}.{type(innermost).__name__}, not {cls.__name__}"
    if "DeepSpeedCPU" in type(innermost).__name__:
        message += (": Accelerate replaced it under ZeRO-Offload; set \"zero_force_ds_cpu_optimizer\": false in the "
                    "DeepSpeed config (hf_cblr.integrations.prepare_deepspeed_config does) to keep it")
    elif type(innermost).__module__.startswith("deepspeed"):
        message += (": DeepSpeed built its own; remove the \"optimizer\" section from the DeepSpeed config so "
                    "that the Trainer's optimizer is used")
    raise RuntimeError(message)


def prepare_deepspeed_config(config: dict[str, Any]) -> dict[str, Any]:
    """Make a DeepSpeed config train the client optimizer (in place; returned for chaining).

    * An ``"optimizer"`` section makes the Trainer hand DeepSpeed a ``DummyOptim``, so DeepSpeed
      would build and train its own optimizer: refused.
    * With ``zero_optimization.offload_optimizer.device`` set (ZeRO-Offload), Accelerate swaps the
      client optimizer for ``DeepSpeedCPUAdam`` unless ``zero_force_ds_cpu_optimizer`` is false: it is
      set to false when absent (the client optimizer then runs on the offloaded fp32 partitions on the
      CPU) and refused when the config sets it to true.
    """
    if "optimizer" in config:
        raise ValueError(
            "the DeepSpeed config has an \"optimizer\" section, so DeepSpeed would build and train that optimizer "
            "instead of the hf_cblr one: remove the \"optimizer\" section"
        )
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload not in (None, "none"):
        if config.get("zero_force_ds_cpu_optimizer", False) is True:
            raise ValueError(
                f"ZeRO-Offload (offload_optimizer.device={offload!r}) with \"zero_force_ds_cpu_optimizer\": true makes "
                "Accelerate replace the hf_cblr optimizer by DeepSpeedCPUAdam: set \"zero_force_ds_cpu_optimizer\": false "
                "in the DeepSpeed config, or remove offload_optimizer"
            )
        config["zero_force_ds_cpu_optimizer"] = False
    return config


class OptimizerCheckCallback(TrainerCallback):
    """Stops training at its start unless the optimizer that steps is a ``cls`` (default: any hf_cblr optimizer)."""

    def __init__(self, cls: type[Optimizer] = CBLR) -> None:
        self.cls = cls

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       optimizer: Any = None, **kwargs: Any) -> None:
        check_optimizer_in_use(optimizer, self.cls)
