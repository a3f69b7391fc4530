"""Model cards: YAML metadata and body from a ModelCardInfo and from a Trainer (its optimizer, precision, evaluation and
the arguments of Trainer.create_model_card), and the template shipped in the wheel. The pushes: test_hub_push.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from torch import nn

import hf_cblr
from hf_cblr import create_optimizer
from hf_cblr.hub import (
    METHOD_URL,
    ModelCardInfo,
    create_model_card,
    model_card_info_from_trainer,
    optimizer_class_name,
    optimizer_hyperparameters,
)

ROOT = Path(__file__).resolve().parents[1]


def front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    assert match is not None, "the card starts with a YAML front matter"
    return yaml.safe_load(match.group(1))


def card_info(**overrides: Any) -> ModelCardInfo:
    values: dict[str, Any] = {
        "model_name": "minilm-sst2-mclr",
        "dataset_label": "glue/sst2",
        "dataset_hub_id": "glue",
        "dataset_config": "sst2",
        "dataset_type": "glue",
        "optimizer_name": "mclr_adam",
        "optimizer_class": "hf_cblr.optim.mclr.MCLR",
        "optimizer_hyperparameters": {"lr": 0.0003, "trust": 0.5, "curvature": "secant_elementwise", "betas": [0.9, 0.98]},
        "metrics": {"accuracy": 0.8765, "loss": 0.31},
        "base_model": "sentence-transformers/all-MiniLM-L6-v2",
        "batch_size": {"global_batch_size": 1024, "batch_size_schedule": "linear:256,256,20000",
                       "batch_size_lr_scaling": "sqrt"},
        "drop": {"drop_fraction": 0.1, "drop_fraction_end": 0.3, "drop_warmup_steps": 20, "drop_selection": "sampled",
                 "drop_scoring": "no_grad"},
        "training": {"learning_rate": 0.0003, "num_train_epochs": 3.0, "seed": 7},
        "repo_id": "someone/minilm-sst2-mclr",
    }
    values.update(overrides)
    return ModelCardInfo(**values)


def test_card_metadata() -> None:
    text = str(create_model_card(card_info()))
    meta = front_matter(text)
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["datasets"] == ["glue"]
    assert meta["metrics"] == ["accuracy"]
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-classification"
    assert {"hf-cblr", "mclr_adam", "arxiv:2012.08795"} <= set(meta["tags"])
    (index,) = meta["model-index"]
    assert index["name"] == "minilm-sst2-mclr"
    (result,) = index["results"]
    assert result["dataset"] == {"name": "glue/sst2", "type": "glue", "config": "sst2", "split": "validation"}
    assert {m["type"]: m["value"] for m in result["metrics"]} == {"accuracy": 0.8765, "loss": 0.31}
    ours = meta["hf_cblr"]
    assert ours["method"] == METHOD_URL
    assert ours["optimizer"] == "mclr_adam"
    assert ours["optimizer_class"] == "hf_cblr.optim.mclr.MCLR"
    assert ours["optimizer_hyperparameters"] == {"lr": 0.0003, "trust": 0.5, "curvature": "secant_elementwise",
                                                 "betas": [0.9, 0.98]}
    assert ours["batch_size"]["batch_size_schedule"] == "linear:256,256,20000"
    assert ours["batch_size"]["batch_size_lr_scaling"] == "sqrt"
    assert ours["drop"] == {"drop_fraction": 0.1, "drop_fraction_end": 0.3, "drop_warmup_steps": 20,
                            "drop_selection": "sampled", "drop_scoring": "no_grad"}
    # huggingface_hub reads the same metadata back, model-index included
    data = ModelCard(text).data
    assert [(r.metric_type, r.metric_value) for r in data.eval_results] == [("accuracy", 0.8765), ("loss", 0.31)]


def test_card_body() -> None:
    text = str(create_model_card(card_info()))
    body = text.split("\n---\n", 1)[1]
    assert "[sentence-transformers/all-MiniLM-L6-v2](https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2)" in body
    assert "[glue/sst2](https://huggingface.co/datasets/glue)" in body
    assert METHOD_URL in body
    assert "| accuracy | 0.8765 |" in body
    assert "| `trust` | 0.5 |" in body
    assert "| `betas` | (0.9, 0.98) |" in body
    assert "`linear:256,256,20000`" in body and "rescaling `sqrt`" in body
    assert "from 0.1 to 0.3" in body and "selection `sampled`" in body and "20 warm-up steps" in body
    assert "| `seed` | 7 |" in body
    assert 'pipeline("text-classification", model="someone/minilm-sst2-mclr")' in body


def test_card_without_hub_base_model_or_dataset() -> None:
    info = card_info(base_model=None, base_model_source="a small BERT config", dataset_hub_id=None, dataset_config=None,
                     dataset_label="hf_cblr synthetic sentiment", dataset_type="generated",
                     drop={"drop_fraction": 0.0, "drop_fraction_end": 0.0}, batch_size={"global_batch_size": 32,
                                                                                          "batch_size_schedule": "constant"})
    text = str(create_model_card(info))
    meta = front_matter(text)
    assert "base_model" not in meta and "datasets" not in meta
    assert meta["model-index"][0]["results"][0]["dataset"]["type"] == "generated"
    assert "fine-tuned from `a small BERT config`" in text
    assert "Constant global batch of 32 samples." in text
    assert "None: every sample of every batch contributed" in text


def test_missing_template_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.md"):
        create_model_card(card_info(), template_path=tmp_path / "nothing.md")


def test_optimizer_hyperparameters_follow_the_base_direction() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    adam_based = optimizer_hyperparameters(create_optimizer(model, "mclr_adam", lr=0.002, trust=0.7, sample_size=64))
    assert adam_based["lr"] == 0.002 and adam_based["trust"] == 0.7 and adam_based["base"] == "adam"
    assert adam_based["curvature"] == "secant_elementwise" and adam_based["aggregate"] == "median"
    assert adam_based["sample_size"] == 64 and adam_based["betas"] == [0.9, 0.999]
    assert not {"momentum", "nesterov", "dampening", "update_interval"} & set(adam_based)
    sgd_based = optimizer_hyperparameters(create_optimizer(model, "cblr", curvature="hvp", update_interval=5))
    assert sgd_based["update_interval"] == 5 and sgd_based["momentum"] == 0.9
    assert not {"betas", "eps", "sample_size", "aggregate"} & set(sgd_based)
    stock = optimizer_hyperparameters(torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1))
    assert stock["lr"] == 0.01 and stock["weight_decay"] == 0.1


def test_card_from_trainer_reads_the_optimizer_that_trains(tmp_path: Path) -> None:
    from transformers import BertConfig, BertForSequenceClassification

    from hf_cblr.trainer import CBLRTrainer, CBLRTrainingArguments

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        max_position_embeddings=64)
    args = CBLRTrainingArguments(
        output_dir=str(tmp_path), optim="mclr_adam", optim_args="trust=0.5,sample_size=128", learning_rate=3e-4,
        weight_decay=0.05, per_device_train_batch_size=8, batch_size_schedule="linear:4,2,64", batch_size_lr_scaling="sqrt",
        drop_fraction=0.25, drop_fraction_end=0.5, drop_warmup_steps=3, drop_selection="sampled", use_cpu=True,
        report_to="none", hub_model_id="someone/tiny",
    )
    trainer = CBLRTrainer(model=BertForSequenceClassification(config), args=args)
    trainer.create_optimizer()
    metrics = {"eval_accuracy": 0.75, "eval_loss": 0.5, "eval_runtime": 1.5, "eval_samples_per_second": 9.0, "epoch": 2.0,
               "eval_samples": 256}
    info = model_card_info_from_trainer(trainer, model_name="tiny", dataset_label="tiny.tsv", metrics=metrics,
                                        dataset_type="csv")
    assert info.optimizer_class == optimizer_class_name(trainer.optimizer) == "hf_cblr.optim.mclr.MCLR"
    assert info.metrics == {"accuracy": 0.75, "loss": 0.5}
    assert info.optimizer_hyperparameters["trust"] == 0.5
    assert info.optimizer_hyperparameters["sample_size"] == 128
    assert info.optimizer_hyperparameters["lr"] == 3e-4
    assert info.optimizer_hyperparameters["weight_decay"] == 0.05  # the decayed group's
    assert info.batch_size["batch_size_schedule"] == "linear:4,2,64"
    assert info.batch_size["global_batch_size"] == 8
    assert info.drop["drop_fraction_end"] == 0.5 and info.drop["drop_selection"] == "sampled"
    assert info.repo_id == "someone/tiny"
    meta = front_matter(str(create_model_card(info)))
    assert meta["hf_cblr"]["optimizer_hyperparameters"]["trust"] == 0.5
    assert meta["hf_cblr"]["drop"]["drop_warmup_steps"] == 3
    assert meta["hf_cblr"]["batch_size"]["batch_size_lr_scaling"] == "sqrt"


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=37, max_position_embeddings=64))


def tiny_trainer(tmp_path: Path, model: nn.Module | None = None, **kwargs: Any) -> Any:
    from hf_cblr.trainer import CBLRTrainer, CBLRTrainingArguments

    args = CBLRTrainingArguments(output_dir=str(tmp_path), optim="mclr_adam", learning_rate=1e-3, use_cpu=True,
                                 report_to="none")
    return CBLRTrainer(model=model if model is not None else tiny_bert(), args=args, **kwargs)


def test_card_precision_is_what_the_run_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`accelerate launch` with `mixed_precision: bf16` sets ACCELERATE_MIXED_PRECISION, not args.bf16; a model loaded
    in bf16 trains in bf16 without any flag."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    trainer = tiny_trainer(tmp_path)
    assert not trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    trainer.create_optimizer()
    info = model_card_info_from_trainer(trainer, model_name="tiny", dataset_label="tiny", metrics={})
    assert info.training["precision"] == "bf16 mixed precision, fp32 weights"
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    trainer = tiny_trainer(tmp_path, model=tiny_bert().to(torch.bfloat16))
    trainer.create_optimizer()
    info = model_card_info_from_trainer(trainer, model_name="tiny", dataset_label="tiny", metrics={})
    assert info.training["precision"] == "bf16"
    assert "| `precision` | bf16 |" in str(create_model_card(info))


def test_card_deepspeed_is_what_the_run_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`accelerate launch` with a DeepSpeed config hands it to the run through the environment, not args.deepspeed: the
    card reads the ZeRO stage of the trainer's DeepSpeed plugin; without DeepSpeed it has no DeepSpeed row."""
    pytest.importorskip("deepspeed")
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    trainer = tiny_trainer(tmp_path)
    assert "deepspeed" not in model_card_info_from_trainer(trainer, model_name="tiny", dataset_label="tiny").training
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ROOT / "configs" / "deepspeed" / "zero3.json"))
    try:
        trainer = tiny_trainer(tmp_path)
        assert trainer.args.deepspeed is None and trainer.is_deepspeed_enabled
        info = model_card_info_from_trainer(trainer, model_name="tiny", dataset_label="tiny")
    finally:
        unset_hf_deepspeed_config()  # the global config that the DeepSpeed plugin registers
    assert info.training["deepspeed"] == "ZeRO-3"
    assert "| `deepspeed` | ZeRO-3 |" in str(create_model_card(info))


def test_card_from_the_arguments_of_trainer_create_model_card(tmp_path: Path) -> None:
    """What CBLRTrainer.create_model_card writes: transformers' arguments mapped onto the card, the rest read from the
    trainer (the latest evaluation, the base model's source, the dataset's builder and evaluated split)."""
    from datasets import Dataset

    from hf_cblr.hub import trainer_model_card_info

    rows = {"input_ids": [[1, 5, 6, 2]] * 8, "attention_mask": [[1, 1, 1, 1]] * 8, "labels": [0, 1] * 4}
    model = tiny_bert()
    model.save_pretrained(tmp_path / "base")
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    trainer = tiny_trainer(tmp_path / "out", model=model, train_dataset=Dataset.from_dict(rows),
                           eval_dataset=Dataset.from_dict(rows, split="dev"))
    trainer.state.log_history = [{"loss": 0.7, "step": 1}, {"eval_loss": 0.9, "step": 1}, {"eval_loss": 0.6,
                                 "eval_accuracy": 0.75, "eval_runtime": 0.1, "step": 2}, {"train_runtime": 3.0}]
    info = trainer_model_card_info(trainer)
    assert info.model_name == "out" and info.base_model is None and info.base_model_source == str(tmp_path / "base")
    assert info.metrics == {"loss": 0.6, "accuracy": 0.75} and info.eval_split == "dev"
    assert info.optimizer_class == "not created yet (the trainer has not trained)"
    info = trainer_model_card_info(trainer, language="en", license="mit", tags="sentiment", model_name="tiny-sst2",
                                   finetuned_from="someone/base", tasks="text-classification", dataset_tags="glue",
                                   dataset="GLUE SST-2", dataset_args="sst2")
    assert (info.model_name, info.language, info.license, info.base_model) == ("tiny-sst2", "en", "mit", "someone/base")
    assert (info.dataset_label, info.dataset_hub_id, info.dataset_config, info.dataset_type) == ("GLUE SST-2", "glue",
                                                                                                  "sst2", "glue")
    assert info.extra_tags == ["sentiment"]
    meta = front_matter(str(create_model_card(info)))
    assert meta["datasets"] == ["glue"] and meta["base_model"] == "someone/base" and "sentiment" in meta["tags"]


def test_template_ships_in_the_package() -> None:
    from hf_cblr.hub import default_template

    assert "{{ card_data }}" in default_template()
    assert str(create_model_card(card_info())) == str(create_model_card(card_info(), template_path=Path(
        hf_cblr.__file__).parent / "hub" / "template.md"))


@pytest.mark.slow
def test_card_from_an_installed_wheel(tmp_path: Path) -> None:
    """A wheel of the package, installed (no dependencies, no source tree on the path) into a fresh virtual environment
    that sees this one's packages, writes a card; it ships the C++ source of the fused step's CPU kernels too."""
    source = Path(hf_cblr.__file__).resolve().parents[1]
    tree = tmp_path / "source"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (tree / name).write_bytes((source / name).read_bytes())
    subprocess.run(["cp", "-r", str(source / "hf_cblr"), str(tree / "hf_cblr")], check=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheels"), str(tree)],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("hf_cblr-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                          capture_output=True, text=True).stdout.strip()
    # This environment's packages (torch, transformers, pip) after the fresh one's; its .pth files (the editable
    # install of hf_cblr) are not processed from there.
    current_site = next(path for path in sys.path if path.endswith("site-packages") and Path(path).is_dir())
    (Path(site) / "dependencies.pth").write_text(current_site + "\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", "-q", "install", "--no-deps", "--no-index",
                    str(wheel)], check=True, env=env, cwd=tmp_path)
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        import hf_cblr.hub
        from hf_cblr.hub import ModelCardInfo, create_model_card
        assert Path(hf_cblr.hub.__file__).is_relative_to(Path(sys.prefix)), hf_cblr.hub.__file__
        info = ModelCardInfo(model_name="wheel-model", dataset_label="tiny", optimizer_name="lamb",
                             optimizer_class="hf_cblr.optim.lamb.LAMB", optimizer_hyperparameters={"lr": 0.001},
                             metrics={"accuracy": 0.5})
        create_model_card(info).save("README.md")
        from hf_cblr.optim._cpu_kernels import SOURCE
        assert SOURCE.is_file() and SOURCE.is_relative_to(Path(sys.prefix)), SOURCE
    """)
    result = subprocess.run([str(python), "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    card = (tmp_path / "README.md").read_text()
    assert front_matter(card)["hf_cblr"]["optimizer"] == "lamb" and "# wheel-model" in card
