"""Model cards: YAML metadata and body from a ModelCardInfo and from a Trainer, and the Hub push, offline."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from torch import nn

from hf_cblr import create_optimizer
from hf_cblr.hub import (
    METHOD_URL,
    ModelCardInfo,
    create_model_card,
    model_card_info_from_trainer,
    optimizer_class_name,
    optimizer_hyperparameters,
    push_to_hub_with_card,
)


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


class _FakeTrainer:
    """What push_to_hub_with_card uses of a Trainer; its push writes a draft card, as Trainer.push_to_hub does."""

    def __init__(self, output_dir: Path) -> None:
        self.args = type("Args", (), {"output_dir": str(output_dir), "hub_token": "token", "hub_revision": None})()
        self.hub_model_id = "someone/model"
        self.pushed: list[str] = []

    def push_to_hub(self, commit_message: str) -> None:
        (Path(self.args.output_dir) / "README.md").write_text("---\nlicense: mit\n---\ndraft card\n")
        self.pushed.append(commit_message)

    def is_world_process_zero(self) -> bool:
        return True


def test_push_replaces_the_trainer_draft_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pushed_cards: list[tuple[str, str, dict[str, Any]]] = []

    def record(card: ModelCard, repo_id: str, **kwargs: Any) -> str:
        pushed_cards.append((str(card), repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}/commit/1"

    monkeypatch.setattr(ModelCard, "push_to_hub", record)
    trainer = _FakeTrainer(tmp_path)
    card = create_model_card(card_info())
    url = push_to_hub_with_card(trainer, card)  # type: ignore[arg-type]
    assert trainer.pushed == ["End of training"]
    assert url == "https://huggingface.co/someone/model/commit/1"
    ((text, repo_id, kwargs),) = pushed_cards
    assert text == str(card) and repo_id == "someone/model" and kwargs["token"] == "token"
    assert (tmp_path / "README.md").read_text() == str(card)
