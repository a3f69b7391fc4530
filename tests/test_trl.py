"""``CBLRSFTTrainer``: trl's ``SFTTrainer`` with the hf_cblr optimizers, ramp, dropping, closure and probes, on a tiny
Llama and a generated text corpus (``tests/workers/trl_worker.py``); DeepSpeed ZeRO-2 on 2 CPU ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import pytest
import torch

trl = pytest.importorskip("trl")

from transformers import HfArgumentParser, TrainerCallback, TrainingArguments  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from workers.trl_worker import (  # noqa: E402
    GLOBAL_BATCH,
    RUNS,
    STEPS,
    corpus,
    tiny_llama,
    tokenizer,
    train,
    training_args,
)

from hf_cblr import MCLR, CBLRSFTConfig, CBLRSFTTrainer, StructureProbeCallback  # noqa: E402
from hf_cblr.integrations import find_optimizer  # noqa: E402
from hf_cblr.trainer import CBLRTrainingArguments  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "trl_worker.py"


class RecordingSFTTrainer(CBLRSFTTrainer):
    """Records the size of every training micro-batch, by optimizer step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batches: dict[int, list[int]] = defaultdict(list)

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if model.training:
            self.micro_batches[self.state.global_step].append(len(inputs["input_ids"]))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class GradientCapture(TrainerCallback):
    """Copies the gradients the optimizer is about to use (after accumulation, before the step)."""

    def __init__(self) -> None:
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.gradients.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def _trainer(tmp_path: Path, trainer_class: type[CBLRSFTTrainer] = CBLRSFTTrainer, num_samples: int = 48,
             callbacks: list[TrainerCallback] | None = None, **kwargs: Any) -> CBLRSFTTrainer:
    return trainer_class(model=tiny_llama(), args=training_args(str(tmp_path), **kwargs), train_dataset=corpus(num_samples),
                         processing_class=tokenizer(), callbacks=callbacks)


def _logged(trainer: CBLRSFTTrainer) -> list[dict[str, float]]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_config_parses_our_arguments_and_keeps_trl_defaults() -> None:
    (args,) = HfArgumentParser(CBLRSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", "out", "--use_cpu", "--optim", "mclr_adam", "--batch_size_schedule", "list:2,4",
         "--drop_fraction", "0.25", "--max_length", "64", "--bf16", "false"])
    assert isinstance(args, SFTConfig) and isinstance(args, CBLRTrainingArguments)
    assert (args.optim, args.batch_size_schedule, args.drop_fraction, args.max_length) == ("mclr_adam", "list:2,4", 0.25, 64)
    assert args.learning_rate == 5e-4  # the registry's recommendation for mclr_adam, not SFTConfig's 2e-5
    with pytest.raises(ValueError, match=r"drop_fraction must be a number in \[0, 1\), got 1.5"):
        CBLRSFTConfig(output_dir="out", use_cpu=True, bf16=False, optim="mclr_adam", drop_fraction=1.5)
    # Every default of SFTConfig stands but learning_rate and those of our own arguments.
    ours = {f.name for f in fields(CBLRTrainingArguments)} - {f.name for f in fields(TrainingArguments)} | {"learning_rate"}
    sft = {f.name: f for f in fields(SFTConfig)}
    for field in fields(CBLRSFTConfig):
        if field.name in sft and field.name not in ours | {"optim"}:
            assert field.default == sft[field.name].default or field.default is MISSING, field.name
    with pytest.raises(TypeError, match="CBLRSFTTrainer needs args=CBLRSFTConfig"):
        CBLRSFTTrainer(model=tiny_llama(), args=SFTConfig(output_dir="out", use_cpu=True, bf16=False),
                       train_dataset=corpus(8), processing_class=tokenizer())


def test_sft_trainer_with_mclr_adam_trains_and_logs_the_layer_rates(tmp_path: Path) -> None:
    probe = StructureProbeCallback(probe_interval=2, log_per_layer=True)
    trainer = _trainer(tmp_path, callbacks=[probe], per_device_train_batch_size=8, num_train_epochs=3,
                       lr_scheduler_type="constant")
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    optimizer = find_optimizer(trainer.optimizer)
    assert isinstance(optimizer, MCLR) and optimizer.base == "adam"
    logged = _logged(trainer)
    assert len(logged) == 18
    first, last = (sum(entry["loss"] for entry in part) / 3 for part in (logged[:3], logged[-3:]))
    assert last < first - 0.1
    assert all(not torch.equal(param, before[name]) for name, param in trainer.model.named_parameters())
    # SFTTrainer's own compute_loss ran (its metrics), and the probes logged every adapted layer's rate.
    assert all("entropy" in entry and "mean_token_accuracy" in entry for entry in logged)
    rates = {key: value for entry in trainer.state.log_history for key, value in entry.items() if key.endswith("/rate")}
    assert "probe/model.layers.0.self_attn.q_proj.weight/rate" in rates
    assert len(set(rates.values())) > 1  # layer-wise, not one global rate
    assert len(probe.records) == 9


def test_ramp_gives_the_scheduled_batch_sizes(tmp_path: Path) -> None:
    """Full batch 4 per device x 2 micro-batches; the optimizer steps take 2, 4, 8, 8 samples."""
    trainer = _trainer(tmp_path, RecordingSFTTrainer, batch_size_schedule="list:2,4,8", per_device_train_batch_size=4,
                       gradient_accumulation_steps=2, max_steps=4)
    trainer.train()
    assert [trainer.micro_batches[step] for step in range(4)] == [[1, 1], [2, 2], [4, 4], [4, 4]]
    assert [entry["global_batch_size"] for entry in _logged(trainer)] == [2, 4, 8, 8]
    assert [entry["consumed_samples"] for entry in _logged(trainer)] == [2, 6, 14, 22]


def _sample_tokens(trainer: CBLRSFTTrainer, index: int) -> torch.Tensor:
    """The token ids of training sample ``index``, unpadded, as SFTTrainer prepared them (``</s>`` appended)."""
    return torch.tensor(trainer.train_dataset[index]["input_ids"])


def test_per_sample_loss_is_the_model_loss_on_the_sample_alone(tmp_path: Path) -> None:
    """Padded by SFTTrainer's collator (labels -100), and with the first labels of a sample masked too."""
    trainer = _trainer(tmp_path, drop_fraction=0.25, per_device_train_batch_size=4)
    model = trainer.model.eval()
    examples = [dict(trainer.train_dataset[index]) for index in range(4)]
    examples[1]["labels"] = [-100, -100, *examples[1]["input_ids"][2:]]  # a masked prompt, as completion_only_loss
    batch = trainer.data_collator(examples)
    assert (batch["labels"] == -100).sum() > 2  # padded
    losses = trainer.per_sample_loss(model, batch)
    for i, example in enumerate(examples):
        ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example.get("labels", example["input_ids"])])
        assert losses[i].item() == pytest.approx(model(input_ids=ids, labels=labels).loss.item(), rel=1e-5), i


@pytest.mark.parametrize("scoring", ["with_grad", "no_grad"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_dropping_gives_the_gradient_of_the_kept_samples(tmp_path: Path, accumulation: int, scoring: str) -> None:
    """Global batch 8 in pools of 8 / accumulation samples, a quarter of each pool dropped: the gradient is that of the
    mean over the kept samples of the model's own loss on each (by hand: each sample alone, the largest kept)."""
    capture = GradientCapture()
    trainer = _trainer(tmp_path, callbacks=[capture], optim="sgd", per_device_train_batch_size=8 // accumulation,
                       gradient_accumulation_steps=accumulation, max_steps=1, drop_fraction=0.25, drop_scoring=scoring)
    reference = tiny_llama()  # the same initial weights, without trl's fused LM head (bound to the trainer's model)
    trainer.train()
    pool_size = 8 // accumulation
    kept_losses = []
    for start in range(0, 8, pool_size):
        losses = torch.stack([reference(input_ids=ids[None], labels=ids[None]).loss
                              for ids in (_sample_tokens(trainer, index) for index in range(start, start + pool_size))])
        kept_losses.append(losses.sort(descending=True).values[: pool_size - pool_size // 4])
    torch.cat(kept_losses).mean().backward()
    (gradient,) = capture.gradients
    for name, param in reference.named_parameters():
        torch.testing.assert_close(gradient[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)
    logged = _logged(trainer)[0]
    assert logged["kept_fraction"] == 6 / 8 and logged["drop_fraction"] == 0.25


def test_dropping_refuses_padding_free_batches(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="drop_fraction needs one row per sample"):
        _trainer(tmp_path, drop_fraction=0.25, padding_free=True, max_length=None)


def test_dft_loss_is_refused_with_dropping_and_with_the_closure(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="loss_type='dft' is not supported with it; valid value: 'nll'"):
        _trainer(tmp_path, drop_fraction=0.25, loss_type="dft")
    trainer = _trainer(tmp_path, optim_args="curvature=hutchinson", loss_type="dft")
    with pytest.raises(ValueError, match="loss_type='dft' is not supported with curvature='hutchinson'"):
        trainer.create_optimizer()


def test_closure_replays_the_sft_loss_without_logging_it(tmp_path: Path) -> None:
    """hutchinson differentiates the closure's gradient: the replay is the model's own loss, equal to SFTTrainer's, and
    SFTTrainer's metrics count each training forward once."""
    trainer = _trainer(tmp_path, optim="mclr_adam", optim_args="curvature=hutchinson", per_device_train_batch_size=4,
                       gradient_accumulation_steps=2, max_steps=2)
    plain = _trainer(tmp_path, optim="mclr_adam", per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2)
    trainer.train()
    plain.train()
    stats = find_optimizer(trainer.optimizer).layer_stats()
    assert all(torch.isfinite(torch.tensor(layer["curvature"])) for layer in stats.values())
    assert [entry["num_tokens"] for entry in _logged(trainer)] == [entry["num_tokens"] for entry in _logged(plain)]
    batch = next(iter(trainer.get_train_dataloader()))
    count = (batch["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(trainer.trainer_loss(trainer.model, dict(batch), num_items_in_batch=count),
                               SFTTrainer.compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=count))


@pytest.mark.multiprocess
def test_deepspeed_zero2_on_two_ranks_matches_one_process(tmp_path: Path) -> None:
    """ZeRO-2 on 2 CPU ranks, mclr_adam, with SFTTrainer's loss and with dropping: the parameters and layer rates of
    one process without DeepSpeed on the same global batches."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), str(tmp_path)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    for run, extra in RUNS.items():
        expected = train(training_args(str(tmp_path / f"reference-{run}"), per_device_train_batch_size=GLOBAL_BATCH,
                                       max_steps=STEPS, **extra))
        result = torch.load(tmp_path / f"{run}.pt", weights_only=False)
        # The loss and gradient norm of every step: Adam's update would hide a wrong loss scale.
        for key in ("loss", "grad_norm"):
            assert result[key] == pytest.approx(expected[key], rel=1e-5), (run, key)
        # Adam's first steps, about lr x g / |g| per element, turn rounding in near-zero gradient elements into update
        # differences of a small fraction of lr (1e-2).
        torch.testing.assert_close(result["parameters"], expected["parameters"], rtol=1e-4, atol=1e-5, msg=run)
        assert result["layer_stats"].keys() == expected["layer_stats"].keys()
        for layer, stats in expected["layer_stats"].items():
            assert result["layer_stats"][layer]["rate"] == pytest.approx(stats["rate"], rel=1e-4), (run, layer)
