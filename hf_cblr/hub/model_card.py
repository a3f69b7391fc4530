"""Model cards for models fine-tuned with this package's optimizers and Trainer.

:func:`create_model_card` renders the template ``hf_cblr/hub/template.md`` (package data, read with
:mod:`importlib.resources`; Jinja2, through ``huggingface_hub.ModelCard.from_template``) from a
:class:`ModelCardInfo`. The YAML metadata holds the Hub's fields (``base_model``, ``datasets``, ``metrics``,
``model-index`` with the metric values, ``tags``, ``library_name``, ``license``, ``pipeline_tag``) and an
``hf_cblr`` block with the optimizer, its hyperparameters, the batch-size schedule, the drop schedule and the link to the
method; the body repeats them as tables with the training arguments. :func:`model_card_info_from_trainer`
reads all of it from a finished :class:`~transformers.Trainer` (the optimizer that actually trained,
unwrapped from Accelerate/DeepSpeed; the precision its accelerator and model ran in; its DeepSpeed ZeRO stage;
its evaluation results), so the card cannot drift from the run.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import math
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hf_cblr.integrations.transformers import innermost_optimizer
from hf_cblr.optim.cblr import CBLR

if TYPE_CHECKING:
    from huggingface_hub import ModelCard
    from transformers import Trainer, TrainingArguments

#: The method: Gao & Zhong, "Curvature-based learning rate ..." (arXiv 2012.08795).
METHOD_URL = "https://arxiv.org/abs/2012.08795"
#: This package.
PACKAGE_URL = "https://pypi.org/project/hf-cblr/"
#: The card template, package data of :mod:`hf_cblr.hub`; pass ``template_path`` to use another.
TEMPLATE_RESOURCE = "template.md"

#: Evaluation entries that describe the run, not the model; left out of the card's results.
_NON_METRICS = ("runtime", "samples", "samples_per_second", "steps_per_second", "epoch")
#: Group entries that are bookkeeping, not hyperparameters.
_NOT_HYPERPARAMETERS = {"params", "param_names", "initial_lr", "weight_decay_mask", "adaptation_mask"}
_SGD_ONLY = {"momentum", "dampening", "nesterov"}
_ADAM_ONLY = {"betas", "eps"}

_OPTIMIZER_DESCRIPTIONS = {
    "cblr": "CBLR: momentum SGD whose every layer (parameter tensor) gets the learning rate `lr · trust / c_l`, "
            "`c_l` an estimate of the layer's curvature (smoothed by an EMA, clamped to `[min_ratio, max_ratio]`).",
    "mclr": "MCLR: CBLR with per-element curvatures aggregated by the median within each layer, and layer rates "
            "`lr · trust · median_k(c_k) / c_l` normalized by the median over layers.",
    "lars": "LARS: CBLR with the weight-norm curvature `c_l = (|g| + β|w|) / |w|`, i.e. the trust ratio "
            "`trust_coefficient · |w| / (|g| + β|w|)` on momentum SGD.",
    "cblr_adam": "CBLR on the Adam direction: AdamW's bias-corrected direction `u`, scaled per layer by "
                 "`trust / c_l`, `c_l` the layer's curvature measured in Adam's preconditioned geometry.",
    "mclr_adam": "MCLR on the Adam direction: AdamW's direction `u` scaled per layer by `trust · median_k(c_k) / c_l`.",
    "lamb": "LAMB: CBLR with the weight-norm curvature on the Adam direction, i.e. the trust ratio `|w| / |u|`.",
}


@dataclass
class ModelCardInfo:
    """Everything a card states. Dicts keep their order in the card's tables."""

    model_name: str
    dataset_label: str
    optimizer_name: str
    optimizer_class: str
    optimizer_hyperparameters: dict[str, Any]
    #: Evaluation results without the ``eval_`` prefix, e.g. ``{"accuracy": 0.91, "loss": 0.25}``.
    metrics: dict[str, float]
    eval_split: str = "validation"
    #: A Hub model id (``base_model`` metadata); None when the model does not come from the Hub.
    base_model: str | None = None
    #: Where the model came from when it is not on the Hub (a local path, "a config"); body text only.
    base_model_source: str | None = None
    dataset_hub_id: str | None = None
    dataset_config: str | None = None
    #: Dataset type of the ``model-index``: the Hub id, or how it was read (``csv``, ``json``, ``generated``).
    dataset_type: str | None = None
    batch_size: dict[str, Any] = field(default_factory=dict)
    drop: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    license: str = "apache-2.0"
    language: str | None = None
    task: str = "text-classification"
    #: The repository named in the usage example (``hub_model_id`` when pushing).
    repo_id: str | None = None
    extra_tags: list[str] = field(default_factory=list)


# -- reading a run -----------------------------------------------------------------------------
def optimizer_hyperparameters(optimizer: Any) -> dict[str, Any]:
    """The hyperparameters of the first param group (the weight-decayed one, in this package's and the
    Trainer's grouping) with the learning rate before any schedule, plus, for the CBLR family, the
    estimator's settings; entries that the optimizer's base direction does not use are left out."""
    optimizer = innermost_optimizer(optimizer)
    group = optimizer.param_groups[0]
    values = {key: value for key, value in group.items() if key not in _NOT_HYPERPARAMETERS}
    values["lr"] = group.get("initial_lr", group["lr"])
    if isinstance(optimizer, CBLR):
        unused = _ADAM_ONLY if optimizer.base == "sgd" else _SGD_ONLY
        values = {key: value for key, value in values.items() if key not in unused}
        estimator = optimizer.estimator
        values.update(base=optimizer.base, curvature=optimizer.curvature)
        if estimator.needs_closure:
            values["update_interval"] = optimizer.update_interval
        if estimator.elementwise:
            values.update(aggregate=estimator.aggregate, sample_size=estimator.sample_size, seed=estimator.seed)
        if optimizer.curvature == "fd":
            values["fd_step"] = estimator.fd_step
    return {key: _plain(value) for key, value in sorted(values.items()) if value is not None}


def optimizer_class_name(optimizer: Any) -> str:
    """``module.Class`` of the optimizer that updates the weights."""
    cls = type(innermost_optimizer(optimizer))
    return f"{cls.__module__}.{cls.__qualname__}"


def batch_size_settings(args: TrainingArguments) -> dict[str, Any]:
    """The batch size and its schedule (``batch_size_schedule`` of :class:`~hf_cblr.trainer.CBLRTrainingArguments`;
    absent from a plain ``TrainingArguments``, where the batch is constant)."""
    return {
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "world_size": args.world_size,
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "batch_size_schedule": getattr(args, "batch_size_schedule", None) or "constant",
        "batch_size_lr_scaling": getattr(args, "batch_size_lr_scaling", "none"),
    }


def drop_settings(args: TrainingArguments) -> dict[str, Any]:
    """The small-loss dropping settings (all 0 / off for a plain ``TrainingArguments``)."""
    fraction = getattr(args, "drop_fraction", 0.0)
    end = getattr(args, "drop_fraction_end", None)
    return {
        "drop_fraction": fraction,
        "drop_fraction_end": fraction if end is None else end,
        "drop_warmup_steps": getattr(args, "drop_warmup_steps", 0),
        "drop_selection": getattr(args, "drop_selection", "topk"),
        "drop_scoring": getattr(args, "drop_scoring", "with_grad"),
    }


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def run_precision(trainer: Trainer) -> str:
    """The precision the run computed in, from what it used rather than from the ``bf16``/``fp16`` flags (which
    ``accelerate launch --mixed_precision`` or a DeepSpeed config bypass): the accelerator's mixed precision
    (``bf16``, ``fp16``, ``fp8``: autocast over the weights) with the dtype of the model's floating-point weights,
    e.g. ``"bf16 mixed precision, fp32 weights"``; without mixed precision, the weights' dtype alone (``"fp32"``;
    ``"bf16"`` for a model loaded in bf16)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    dtypes = {parameter.dtype for parameter in model.parameters() if parameter.is_floating_point()}
    weights = ", ".join(sorted(_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch.")) for dtype in dtypes)) or "fp32"
    mixed = str(trainer.accelerator.mixed_precision)
    return weights if mixed == "no" else f"{mixed} mixed precision, {weights} weights"


def run_deepspeed(trainer: Trainer) -> str | None:
    """The DeepSpeed ZeRO stage the run used (``"ZeRO-2"``), from the trainer's accelerator rather than from
    ``args.deepspeed`` (None under ``accelerate launch`` with a DeepSpeed config): the stage of its DeepSpeed plugin,
    which the engine runs; None without DeepSpeed."""
    if not trainer.is_deepspeed_enabled:
        return None
    return f"ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"


def training_settings(args: TrainingArguments, precision: str, deepspeed: str | None) -> dict[str, Any]:
    """The training arguments a reader needs to reproduce the run; ``precision`` as :func:`run_precision` reads it,
    ``deepspeed`` as :func:`run_deepspeed` (None: no DeepSpeed)."""
    values: dict[str, Any] = {
        "optim": _plain(args.optim),
        "optim_args": args.optim_args,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "lr_scheduler_type": _plain(args.lr_scheduler_type),
        "warmup_steps": args.warmup_steps,
        "num_train_epochs": args.num_train_epochs,
        "max_steps": args.max_steps if args.max_steps > 0 else None,
        "max_grad_norm": args.max_grad_norm,
        "per_device_eval_batch_size": args.per_device_eval_batch_size,
        "precision": precision,
        "seed": args.seed,
        "deepspeed": deepspeed,
    }
    return {key: value for key, value in values.items() if value is not None}


def latest_evaluation(trainer: Trainer) -> dict[str, float]:
    """The ``eval_*`` metrics of the trainer's latest evaluation (its last such entry of ``state.log_history``); empty
    when it has not evaluated."""
    for entry in reversed(trainer.state.log_history):
        metrics = {key: value for key, value in entry.items() if key.startswith("eval_")}
        if metrics:
            return metrics
    return {}


def model_card_info_from_trainer(trainer: Trainer, *, model_name: str, dataset_label: str,
                                 metrics: dict[str, float] | None = None, **fields: Any) -> ModelCardInfo:
    """A :class:`ModelCardInfo` from ``trainer``: its optimizer (the one that actually stepped; before training, the
    one its arguments configure), arguments, precision (:func:`run_precision`) and DeepSpeed ZeRO stage
    (:func:`run_deepspeed`); ``metrics`` as returned by
    ``trainer.evaluate()`` (``eval_`` prefixes and run statistics are dropped; default: :func:`latest_evaluation`);
    ``fields`` set the other :class:`ModelCardInfo` fields."""
    args = trainer.args
    if trainer.optimizer is not None:
        optimizer_class, hyperparameters = optimizer_class_name(trainer.optimizer), optimizer_hyperparameters(trainer.optimizer)
    else:
        optimizer_class, hyperparameters = "not created yet (the trainer has not trained)", {"lr": args.learning_rate}
    results = {}
    for key, value in (latest_evaluation(trainer) if metrics is None else metrics).items():
        name = key.removeprefix("eval_")
        if name not in _NON_METRICS and isinstance(value, (int, float)):
            results[name] = float(value)
    return ModelCardInfo(
        model_name=model_name,
        dataset_label=dataset_label,
        optimizer_name=_plain(getattr(trainer, "optimizer_name", args.optim)),
        optimizer_class=optimizer_class,
        optimizer_hyperparameters=hyperparameters,
        metrics=results,
        batch_size=batch_size_settings(args),
        drop=drop_settings(args),
        training=training_settings(args, run_precision(trainer), run_deepspeed(trainer)),
        repo_id=fields.pop("repo_id", None) or args.hub_model_id,
        **fields,
    )


# -- rendering -------------------------------------------------------------------------------
def default_template() -> str:
    """The text of the card template that ships in the package (``hf_cblr/hub/template.md``)."""
    return importlib.resources.files("hf_cblr.hub").joinpath(TEMPLATE_RESOURCE).read_text(encoding="utf-8")


def create_model_card(info: ModelCardInfo, template_path: str | Path | None = None) -> ModelCard:
    """Render the card of ``info`` from the Jinja2 template at ``template_path`` (default: the packaged
    ``hf_cblr/hub/template.md``, :func:`default_template`)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    if template_path is None:
        template = default_template()
    elif Path(template_path).is_file():
        template = Path(template_path).read_text(encoding="utf-8")
    else:
        raise FileNotFoundError(f"model card template {template_path} not found (template_path: a Jinja2 file, or None "
                                "for the packaged hf_cblr/hub/template.md)")
    metric_ids = [name for name in info.metrics if name != "loss"]
    dataset_type = info.dataset_type or info.dataset_hub_id or "local"
    eval_results = [
        EvalResult(task_type=info.task, dataset_type=dataset_type, dataset_name=info.dataset_label,
                   dataset_config=info.dataset_config, dataset_split=info.eval_split, metric_type=name,
                   metric_name=name, metric_value=round(value, 6))
        for name, value in info.metrics.items()
    ]
    tags = ["hf-cblr", info.optimizer_name, "large-batch", "layer-wise-learning-rate", f"arxiv:{METHOD_URL.rsplit('/', 1)[-1]}"]
    tags += [tag for tag in info.extra_tags if tag not in tags]
    card_data = ModelCardData(
        base_model=info.base_model,
        datasets=[info.dataset_hub_id] if info.dataset_hub_id else None,
        eval_results=eval_results or None,
        language=info.language,
        library_name="transformers",
        license=info.license,
        metrics=metric_ids or None,
        model_name=info.model_name,
        pipeline_tag=info.task,
        tags=tags,
        hf_cblr={
            "method": METHOD_URL,
            "package": PACKAGE_URL,
            "optimizer": info.optimizer_name,
            "optimizer_class": info.optimizer_class,
            "optimizer_hyperparameters": info.optimizer_hyperparameters,
            "batch_size": info.batch_size,
            "drop": info.drop,
        },
    )
    return ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=info.model_name,
        base_model=info.base_model,
        base_model_source=info.base_model_source,
        task=info.task,
        task_name=info.task.replace("-", " "),
        dataset_label=info.dataset_label,
        dataset_hub_id=info.dataset_hub_id,
        eval_split=info.eval_split,
        optimizer_name=info.optimizer_name,
        optimizer_class=info.optimizer_class,
        optimizer_description=_OPTIMIZER_DESCRIPTIONS.get(
            info.optimizer_name, f"`{info.optimizer_name}`, a stock optimizer of `transformers.TrainingArguments.optim`."
        ),
        method_url=METHOD_URL,
        package_url=PACKAGE_URL,
        results=_rows(info.metrics),
        optimizer_rows=_rows(info.optimizer_hyperparameters),
        batch_size_description=_describe_batch_size(info.batch_size),
        batch_size_rows=_rows(info.batch_size),
        drop_description=_describe_drop(info.drop),
        drop_rows=_rows(info.drop),
        training_rows=_rows(info.training),
        repo_id=info.repo_id or info.model_name,
        versions=_versions(),
    )


def _describe_batch_size(settings: dict[str, Any]) -> str:
    schedule = settings.get("batch_size_schedule", "constant")
    if schedule == "constant":
        return f"Constant global batch of {settings.get('global_batch_size')} samples."
    return (f"The global batch followed the schedule `{schedule}` (keyed to consumed samples), with learning-rate "
            f"rescaling `{settings.get('batch_size_lr_scaling', 'none')}` at each change.")


def _describe_drop(settings: dict[str, Any]) -> str:
    start, end = settings.get("drop_fraction", 0.0), settings.get("drop_fraction_end", 0.0)
    if start == 0 and end == 0:
        return "None: every sample of every batch contributed to the loss."
    fraction = f"{start:g}" if start == end else f"from {start:g} to {end:g}"
    return (f"Each global batch kept only its highest-loss samples, dropping the fraction {fraction} of smallest "
            f"losses (selection `{settings.get('drop_selection')}`, scoring `{settings.get('drop_scoring')}`, "
            f"{settings.get('drop_warmup_steps', 0)} warm-up steps).")


def _rows(values: dict[str, Any]) -> list[tuple[str, str]]:
    return [(name, _format(value)) for name, value in values.items()]


def _format(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and value != 0 and not value.is_integer():
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_format(v) for v in value) + ")"
    return str(value)


def _plain(value: Any) -> Any:
    """Enum members by value, tensors as numbers, tuples as lists: what YAML and JSON hold."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Tensor):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _versions() -> dict[str, str]:
    versions = {}
    for package in ("hf-cblr", "transformers", "torch", "datasets", "accelerate", "deepspeed"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
