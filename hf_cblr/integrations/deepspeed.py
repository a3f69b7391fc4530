"""DeepSpeed entry points: ``"optimizer": {"type": "CBLR" | "MCLRAdam" | ...}`` in a DeepSpeed config, and the checks.

Every optimizer of this package, with any estimator that needs no closure, is exact under ZeRO-1/2/3
by itself (the optimizer finds the layers behind ZeRO's flat partitions: :mod:`hf_cblr.optim.partitioned`, ``docs/zero.md``), MCLR
included: its element samples are drawn from the whole layers as in one process, each rank measures
the sampled elements of its own fragments and one all-reduce per partition and step assembles them,
so its rates do not depend on the world size. One
built in code (``hf_cblr.create_optimizer``, ``hf_cblr.CBLR``) can be passed to
``deepspeed.initialize(optimizer=...)`` as it is. What DeepSpeed cannot do is build one from its
config: its optimizer names are a fixed list, and an unknown ``type`` falls back to ``torch.optim``.
This module does that, and sets the two config flags a client optimizer needs:

* :func:`initialize` (``deepspeed.initialize`` for a config dict or JSON path): builds our section,
  sets ``zero_allow_untested_optimizer``, keeps our optimizer under ZeRO-Offload
  (``zero_force_ds_cpu_optimizer: false``, or a clear error where the config forces DeepSpeedCPUAdam),
  and refuses estimators that cannot run on ZeRO partitions (those that need a closure) before any step.
* :func:`optimizer_from_config` for ``accelerate launch`` scripts: build the optimizer from the
  plugin's config before ``accelerator.prepare``::

      optimizer = optimizer_from_config(accelerator.state.deepspeed_plugin.deepspeed_config, model)
      model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

* :func:`pop_optimizer_section`, and :func:`take_trainer_optimizer_section`, which
  :class:`~hf_cblr.trainer.CBLRTrainer` uses for a DeepSpeed config with our section.

**Type names**: one per registry optimizer (``CBLR``, ``MCLRAdam``, ``HfCblrLAMB`` ...), derived and matched as
:mod:`hf_cblr.integrations.deepspeed_types` says; the base is part of the type, so a ``"base"`` in ``"params"`` is
refused, naming the types.

**"auto" params.** Under ``CBLRTrainer`` transformers' ``HfTrainerDeepSpeedConfig`` fills the section's ``"auto"``
values as it does for DeepSpeed's own optimizers (:data:`TRAINER_FILLED_PARAMS`: ``lr`` from ``learning_rate``,
``betas`` from ``[adam_beta1, adam_beta2]``, ``eps`` from ``adam_epsilon``, ``weight_decay`` from ``weight_decay``),
and a value given there that differs from the training argument stops training when it starts (its mismatch check).
Any other ``"auto"`` is refused: no training argument fills it. Without ``learning_rate``,
:class:`~hf_cblr.trainer.CBLRTrainingArguments` takes the learning rate that the registry recommends for the section's
type, whatever ``optim`` says (:func:`~hf_cblr.integrations.deepspeed_types.trainer_deepspeed_optimizer`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

from torch import nn

from hf_cblr.integrations.deepspeed_types import (
    DEEPSPEED_OPTIMIZER_TYPES,
    DEEPSPEED_OWN_OPTIMIZER_TYPES,
    HF_CBLR_TYPE_PREFIX,
    deepspeed_type,
    registry_name_of_type,
)
from hf_cblr.integrations.transformers import check_optimizer_arguments, parse_optim_args, prepare_deepspeed_config
from hf_cblr.optim.cblr import CBLR
from hf_cblr.optim.partitioned import check_zero_support
from hf_cblr.optim.registry import check_optimizer_kwargs, create_optimizer

if TYPE_CHECKING:
    from hf_cblr.trainer.arguments import CBLRTrainingArguments

__all__ = [
    "DEEPSPEED_OPTIMIZER_TYPES",
    "DEEPSPEED_OWN_OPTIMIZER_TYPES",
    "HF_CBLR_TYPE_PREFIX",
    "TRAINER_FILLED_PARAMS",
    "deepspeed_type",
    "initialize",
    "optimizer_from_config",
    "pop_optimizer_section",
    "take_trainer_optimizer_section",
    "zero_stage",
]

#: The section's ``params`` that transformers' ``HfTrainerDeepSpeedConfig`` fills from the training arguments where they
#: are ``"auto"`` (and checks against them where they are not), as for DeepSpeed's own optimizers.
TRAINER_FILLED_PARAMS = {"lr": "learning_rate", "betas": "[adam_beta1, adam_beta2]", "eps": "adam_epsilon",
                         "weight_decay": "weight_decay"}
#: Lower-cased types of DeepSpeed's own that are also the plain spelling of a registry optimizer (``lamb``).
_SHADOWED_TYPES = {type_name[len(HF_CBLR_TYPE_PREFIX):].lower(): name for type_name, name in DEEPSPEED_OPTIMIZER_TYPES.items()
                   if type_name.startswith(HF_CBLR_TYPE_PREFIX)}


def pop_optimizer_section(config: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """Pop ``config["optimizer"]`` if its ``type`` is one of :data:`DEEPSPEED_OPTIMIZER_TYPES` (any case).

    Returns the registry name and the section's ``params`` (names checked: ``TypeError`` naming any
    the optimizer does not take; ``ValueError`` for a ``"base"``, which is part of the type), and sets
    ``zero_allow_untested_optimizer``, which DeepSpeed requires for any optimizer outside its own list.
    Returns None, leaving ``config`` as it is, for a section that DeepSpeed builds itself; a type that
    looks like ours but is none of them raises ``ValueError`` naming the valid types.
    """
    section = config.get("optimizer")
    if not section:
        return None
    name = registry_name_of_type(str(section.get("type", "")))
    if name is None:
        return None
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"the DeepSpeed config's \"optimizer\" section {section['type']!r} has \"params\": {params!r}; "
                         f"give a JSON object of {name}'s arguments, e.g. {{\"lr\": 0.1}}, or leave it out")
    params = dict(params)
    if "base" in params:
        raise ValueError(f"the DeepSpeed config's \"optimizer\" section {section['type']!r} sets \"base\" in \"params\": "
                         f"the base direction is part of the type ({sorted(DEEPSPEED_OPTIMIZER_TYPES)}): leave \"base\" out")
    check_optimizer_kwargs(name, params)
    config.pop("optimizer")
    config["zero_allow_untested_optimizer"] = True
    return name, params


def optimizer_from_config(config: dict[str, Any], model_or_params: nn.Module | Iterable[Any]) -> CBLR | None:
    """Pop our ``"optimizer"`` section from ``config`` (:func:`pop_optimizer_section`) and build it.

    A model is grouped as :func:`hf_cblr.create_optimizer` groups it (named groups: biases and norm
    layers get neither weight decay nor a layer rate). Returns None for any other section.
    """
    spec = pop_optimizer_section(config)
    if spec is None:
        return None
    name, params = spec
    auto = sorted(key for key, value in params.items() if value == "auto")
    if auto:
        raise ValueError(f"the DeepSpeed config's \"optimizer\" params {auto} are \"auto\", which only the Hugging Face "
                         "Trainer fills in (from its training arguments): give their values here, or train with CBLRTrainer")
    return cast(CBLR, create_optimizer(model_or_params, name, **params))


#: Attribute of the training arguments that keeps the DeepSpeed config's hf_cblr "optimizer" section once popped.
_POPPED_SECTION = "_hf_cblr_deepspeed_optimizer_section"


def take_trainer_optimizer_section(args: CBLRTrainingArguments, deepspeed_config: dict[str, Any], *,
                                   optimizer_given: bool) -> tuple[str, dict[str, Any]] | None:
    """Our ``"optimizer"`` section of a Trainer's DeepSpeed config, popped before ``deepspeed_init`` hands DeepSpeed a
    ``DummyOptim`` for it: the registry name and the keyword arguments to build it with (``args.optimizer_kwargs``
    under the section's ``params``), checked. The config dict is the training arguments' own, so the popped section is
    kept on ``args`` for any later Trainer built on them. ``optimizer_given``: the Trainer also got an optimizer
    (``optimizers=`` or ``optimizer_cls_and_kwargs=``), which is refused with a section.

    The section's ``"auto"`` params were filled by transformers from the training arguments
    (:data:`TRAINER_FILLED_PARAMS`); any other ``"auto"`` is refused here. A section of DeepSpeed's own type that is
    the plain spelling of ``args.optim`` (``"LAMB"`` with ``optim="lamb"``) is refused, naming the type to write."""
    section_type = str((deepspeed_config.get("optimizer") or {}).get("type", "")).lower()
    if _SHADOWED_TYPES.get(section_type) == args.optim:
        raise ValueError(f"the DeepSpeed config's \"optimizer\" type {section_type.upper()!r} is DeepSpeed's own, not "
                         f"hf_cblr's optim={args.optim!r}: write \"type\": {deepspeed_type(args.optim)!r}, or remove the "
                         f"\"optimizer\" section (optim={args.optim!r} builds it)")
    spec = pop_optimizer_section(deepspeed_config)
    if spec is None:
        spec = getattr(args, _POPPED_SECTION, None)
    if spec is None:
        return None
    setattr(args, _POPPED_SECTION, spec)
    name, params = spec[0], dict(spec[1])
    if optimizer_given:
        raise ValueError("the optimizer is given both in the DeepSpeed config (\"optimizer\" section) and to the Trainer "
                         "(optimizers= or optimizer_cls_and_kwargs=): give one")
    if args.uses_hf_cblr_optimizer and args.optim != name:
        raise ValueError(f"optim={args.optim!r}, but the DeepSpeed config's \"optimizer\" section is {name!r}: "
                         "give one optimizer")
    # The decayed groups' weight decay is args.weight_decay, which transformers matched against the section's.
    params.pop("weight_decay", None)
    unfilled = sorted(key for key, value in params.items() if value == "auto")
    if unfilled:
        raise ValueError(f"the DeepSpeed config's \"optimizer\" params {unfilled} are \"auto\", which no training argument "
                         f"fills (transformers fills {sorted(TRAINER_FILLED_PARAMS)}): give their values")
    given = parse_optim_args(args.optim_args) if args.optim == name else {}
    clashes = sorted(key for key in params.keys() & given.keys() if params[key] != given[key])
    if clashes:
        raise ValueError(f"optim_args and the DeepSpeed config's \"optimizer\" section give different {clashes}: "
                         "give each argument once")
    kwargs = {**args.optimizer_kwargs(name), **params}
    check_optimizer_arguments(name, kwargs)
    return name, kwargs


def zero_stage(config: dict[str, Any]) -> int:
    """The ZeRO stage of a DeepSpeed config (0: no ZeRO, DeepSpeed's default)."""
    return int(config.get("zero_optimization", {}).get("stage", 0))


def initialize(model: nn.Module, config: dict[str, Any] | str | os.PathLike[str], optimizer: Any = None,
               **kwargs: Any) -> tuple[Any, ...]:
    """``deepspeed.initialize`` that also builds ``"optimizer": {"type": "CBLR" | "MCLRAdam" | ..., "params": {...}}``.

    ``config`` is a dict (not modified) or the path of a JSON file. With our optimizer (from the
    config, or passed as ``optimizer``): ``zero_allow_untested_optimizer`` is set; under ZeRO-Offload
    it runs on the offloaded CPU partitions (``zero_force_ds_cpu_optimizer`` is set to false; a
    config that sets it to true is refused, since DeepSpeed would then stop or swap in
    DeepSpeedCPUAdam); under ZeRO an estimator that needs a closure (``hvp``, ``fd``, ``hutchinson``)
    raises ``NotImplementedError`` here. MCLR (``secant_elementwise``) is exact under ZeRO-1/2/3 as long as
    one ``step`` sees all its adapted layers: under ZeRO-3 their param group must be one sub-group
    (``sub_group_size``, DeepSpeed's default 1e9), else its first step raises ``NotImplementedError``.
    Returns what ``deepspeed.initialize`` returns: ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    import deepspeed

    if not isinstance(config, dict):
        with open(config) as file:
            try:
                config = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(f"the DeepSpeed config {os.fspath(config)!r} is not valid JSON: {error}") from None
    config = dict(config)
    built = optimizer_from_config(config, model)
    if built is not None:
        if optimizer is not None:
            raise ValueError("an optimizer is given both in the DeepSpeed config and as `optimizer`: give one")
        optimizer = built
    if isinstance(optimizer, CBLR):
        if zero_stage(config) > 0:
            check_zero_support(optimizer.estimator)
        config["zero_allow_untested_optimizer"] = True
        prepare_deepspeed_config(config)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=config, **kwargs)
