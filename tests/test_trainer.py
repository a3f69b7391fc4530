"""CBLRTrainer in one process: batch-size ramping (sizes seen, accumulation, resume, LR scaling, epochs), exact
small-loss dropping, and the curvature closure of the hvp/fd estimators."""

from __future__ import annotations

import copy
import json
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments
from workers.tiny import IndexedDataset, kept_mean_gradient, sample_indices, tiny_bert

from hf_cblr import CBLR
from hf_cblr.integrations import find_optimizer
from hf_cblr.trainer import CBLRTrainer, CBLRTrainingArguments
from hf_cblr.trainer.batch_schedule import ScheduledBatchSampler


def _args(tmp_path: Path, **kwargs: Any) -> CBLRTrainingArguments:
    defaults = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                    disable_tqdm=True, learning_rate=0.01, optim="cblr", max_grad_norm=0.0)
    return CBLRTrainingArguments(**{**defaults, **kwargs})


class RecordingTrainer(CBLRTrainer):
    """Records the dataset indices of every training micro-batch, by optimizer step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batches: dict[int, list[list[int]]] = defaultdict(list)

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False, num_items_in_batch: Any = None) -> Any:
        if model.training:
            self.micro_batches[self.state.global_step].append(sample_indices(inputs))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)


class StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


# 20 samples, 2 epochs = 40 samples; the full batch is 6 x 1 rank x 2 micro-batches = 12.
# Consumed before each step: 0, 4, 8, 12, 20, 28, 36 -> sizes 4, 4, 4, 8, 8, 8, 12 (48 samples).
RAMP = dict(batch_size_schedule="milestones:0=4,12=8,30=12", per_device_train_batch_size=6,
            gradient_accumulation_steps=2, num_train_epochs=2)
PLAN = [4, 4, 4, 8, 8, 8, 12]


def test_ramp_yields_the_scheduled_batches_with_accumulation_and_across_resume(tmp_path: Path) -> None:
    dataset = IndexedDataset(20)
    straight = RecordingTrainer(model=tiny_bert(), args=_args(tmp_path / "straight", **RAMP), train_dataset=dataset)
    straight.train()
    steps = [straight.micro_batches[step] for step in range(len(PLAN))]
    assert len(straight.micro_batches) == len(PLAN)
    assert [[len(micro) for micro in step] for step in steps] == [[size // 2] * 2 for size in PLAN]
    stream = [index for step in steps for micro in step for index in micro]
    assert sorted(stream[:20]) == list(range(20)) and sorted(stream[20:40]) == list(range(20))
    logged = [entry for entry in straight.state.log_history if "loss" in entry]
    assert [entry["global_batch_size"] for entry in logged] == PLAN
    assert [entry["consumed_samples"] for entry in logged] == [4, 8, 12, 20, 28, 36, 48]
    assert straight.state.epoch == pytest.approx(48 / 20)

    first = RecordingTrainer(model=tiny_bert(), args=_args(tmp_path / "resumed", save_strategy="steps", save_steps=3, **RAMP),
                             train_dataset=dataset, callbacks=[StopAt(3)])
    first.train()
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["BatchScheduleCallback"]["attributes"]["consumed_samples"] == 12
    second = RecordingTrainer(model=tiny_bert(), args=_args(tmp_path / "resumed", **RAMP), train_dataset=dataset)
    second.train(resume_from_checkpoint=str(checkpoint))
    assert sorted(first.micro_batches) == [0, 1, 2] and sorted(second.micro_batches) == [3, 4, 5, 6]
    assert [first.micro_batches[s] for s in range(3)] + [second.micro_batches[s] for s in range(3, 7)] == steps
    for name, param in second.model.named_parameters():
        assert torch.allclose(param, dict(straight.model.named_parameters())[name], atol=1e-6), name


def test_resume_refuses_a_checkpoint_of_another_schedule(tmp_path: Path) -> None:
    dataset = IndexedDataset(20)
    args = _args(tmp_path, save_strategy="steps", save_steps=3, **RAMP)
    CBLRTrainer(model=tiny_bert(), args=args, train_dataset=dataset, callbacks=[StopAt(3)]).train()
    other = _args(tmp_path, **{**RAMP, "batch_size_schedule": "list:4,8"})
    trainer = CBLRTrainer(model=tiny_bert(), args=other, train_dataset=dataset)
    with pytest.raises(ValueError, match="the checkpoint consumed 12 samples in 3 steps, but batch_size_schedule gives 20"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))


@pytest.mark.parametrize(("scaling", "factors"), [("linear", [1 / 3, 2 / 3, 1, 1]), ("sqrt", [3**-0.5, (2 / 3) ** 0.5, 1, 1])])
def test_learning_rate_follows_the_batch_size(tmp_path: Path, scaling: str, factors: list[float]) -> None:
    args = _args(tmp_path, batch_size_schedule="list:4,8,12", batch_size_lr_scaling=scaling, per_device_train_batch_size=12,
                 max_steps=4, lr_scheduler_type="constant", learning_rate=0.3)
    trainer = CBLRTrainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset(20))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["global_batch_size"] for entry in logged] == [4, 8, 12, 12]
    assert [entry["learning_rate"] for entry in logged] == pytest.approx([0.3 * f for f in factors])


def test_epoch_strategies_fire_at_data_epoch_ends(tmp_path: Path) -> None:
    dataset = IndexedDataset(20)
    trainer = CBLRTrainer(model=tiny_bert(), args=_args(tmp_path, eval_strategy="epoch", **RAMP), train_dataset=dataset,
                          eval_dataset=dataset)
    trainer.train()
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    # Step 5 reaches 20 consumed samples (the end of epoch 0); the last step (48 samples) ends training.
    assert [(entry["step"], entry["epoch"]) for entry in evaluations] == [(4, 1.0), (7, 2.4)]


def test_schedule_sizes_must_split_over_micro_batches(tmp_path: Path) -> None:
    args = _args(tmp_path, batch_size_schedule="list:4,5", per_device_train_batch_size=4, gradient_accumulation_steps=2)
    message = "global batch 5, which must be a multiple of world_size x gradient_accumulation_steps = 2"
    with pytest.raises(ValueError, match=message):
        CBLRTrainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset(20))


def test_needs_cblr_training_arguments(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="CBLRTrainer needs CBLRTrainingArguments"):
        CBLRTrainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))


class GradientCapture(TrainerCallback):
    """Copies the gradients the optimizer is about to use (after accumulation, before the step)."""

    def __init__(self) -> None:
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.gradients.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("scoring", ["with_grad", "no_grad"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_dropping_gives_the_gradient_of_the_kept_mean(tmp_path: Path, accumulation: int, scoring: str) -> None:
    """Global batch 8 in pools of 8 / accumulation samples, a quarter of each pool dropped: the gradient is that
    of the mean loss over the kept samples only (by hand: sort the losses of each pool, keep the largest)."""
    dataset, capture = IndexedDataset(16), GradientCapture()
    args = _args(tmp_path, optim="sgd", per_device_train_batch_size=8 // accumulation, gradient_accumulation_steps=accumulation,
                 max_steps=1, train_sampling_strategy="sequential", drop_fraction=0.25, drop_scoring=scoring)
    model = tiny_bert()
    reference = copy.deepcopy(model)
    trainer = CBLRTrainer(model=model, args=args, train_dataset=dataset, callbacks=[capture])
    trainer.train()
    pools = [list(range(start, start + 8 // accumulation)) for start in range(0, 8, 8 // accumulation)]
    expected = kept_mean_gradient(reference, dataset, pools, 0.25)
    (gradient,) = capture.gradients
    assert gradient.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.allclose(gradient[name], value, atol=1e-7, rtol=1e-5), name
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert logged["kept_fraction"] == 6 / 8 and logged["drop_fraction"] == 0.25


def test_drop_schedule_warms_up(tmp_path: Path) -> None:
    args = _args(tmp_path, per_device_train_batch_size=8, max_steps=3, drop_fraction=0.5, drop_warmup_steps=2)
    trainer = CBLRTrainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset(24))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["drop_fraction"] for entry in logged] == [0.0, 0.25, 0.5]
    assert [entry["kept_fraction"] for entry in logged] == [1.0, 6 / 8, 4 / 8]


def _curvature_run(tmp_path: Path, curvature: str, max_steps: int, **kwargs: Any) -> tuple[CBLR, int]:
    """Train the tiny BERT (dropout on) with CBLR and ``curvature``; the optimizer and the number of forwards."""
    model = tiny_bert(dropout=0.1)
    forwards = []
    model.register_forward_pre_hook(lambda module, inputs: forwards.append(1))
    args = _args(tmp_path / curvature, optim="cblr", optim_args=f"curvature={curvature},update_interval=2,trust=0.01",
                 per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=max_steps, **kwargs)
    trainer = CBLRTrainer(model=model, args=args, train_dataset=IndexedDataset(24))
    trainer.train()
    return trainer.optimizer.optimizer, len(forwards)


@pytest.mark.parametrize("drop", [0.0, 0.25], ids=["all", "dropping"])
def test_hvp_and_fd_closures_inside_the_trainer(tmp_path: Path, drop: float) -> None:
    """The closure replays the step's loss (same micro-batches, normalization, dropout masks): the finite difference
    of gradients then measures the same curvature as the exact Hessian-vector product."""
    hvp, hvp_forwards = _curvature_run(tmp_path, "hvp", max_steps=1, drop_fraction=drop)
    fd, fd_forwards = _curvature_run(tmp_path, "fd", max_steps=1, drop_fraction=drop)
    # 2 training forwards, 2 closure forwards (one per micro-batch); scoring without autograd adds none here.
    assert hvp_forwards == fd_forwards == 4
    hvp_curvatures, fd_curvatures = _curvatures(hvp), _curvatures(fd)
    # The key biases have an exactly zero gradient (softmax ignores them): no curvature along it to measure.
    measured = [name for name in hvp_curvatures if not name.endswith("key.bias")]
    assert len(measured) == 39 and all(hvp_curvatures[name] > 0 for name in measured)
    for name in measured:
        assert fd_curvatures[name] == pytest.approx(hvp_curvatures[name], rel=0.02), name


def _curvatures(optimizer: CBLR) -> dict[str, float]:
    return {name: optimizer.state[param]["curvature"].item() for group in optimizer.param_groups
            for name, param in zip(group["param_names"], group["params"], strict=True)}


def test_closure_is_supplied_every_update_interval_steps(tmp_path: Path) -> None:
    _, forwards = _curvature_run(tmp_path, "fd", max_steps=3)
    assert forwards == 3 * 2 + 2 * 2  # closures at steps 1 and 3 (update_interval=2), 2 micro-batches each


class VariableLengthDataset(IndexedDataset):
    """Sample ``i`` keeps its first ``2 + (5 i) % 7`` tokens."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(index)
        return {**item, "input_ids": item["input_ids"][: 2 + (5 * index) % 7]}


def _pad(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.nn.utils.rnn.pad_sequence([sample["input_ids"] for sample in samples], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(sample["input_ids"]) for sample in samples], batch_first=True)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([sample["labels"] for sample in samples])}


def test_group_by_length_cuts_random_global_batches_into_length_sorted_micro_batches(tmp_path: Path) -> None:
    """Without a schedule too: every step's samples are the random stream's, its micro-batches in decreasing length."""
    dataset = VariableLengthDataset(24, length=8)
    args = _args(tmp_path, per_device_train_batch_size=3, gradient_accumulation_steps=4, num_train_epochs=2,
                 train_sampling_strategy="group_by_length", seed=5)
    trainer = RecordingTrainer(model=tiny_bert(), args=args, train_dataset=dataset, data_collator=_pad)
    trainer.train()
    assert trainer.state.global_step == 4
    stream = ScheduledBatchSampler(24, [12] * 4, 4, seed=5)
    expected = [[i for chunk in chunks for i in chunk] for chunks in zip(*[iter(stream)] * 4, strict=True)]
    for step in range(4):
        samples = [i for micro in trainer.micro_batches[step] for i in micro]
        assert sorted(samples) == sorted(expected[step])
        lengths = [2 + (5 * i) % 7 for i in samples]
        assert lengths == sorted(lengths, reverse=True)


def test_the_default_estimator_measures_the_noise_of_the_trainers_accumulated_micro_batches(tmp_path: Path) -> None:
    """cblr_adam's default secant_denoised through the Trainer: its hooks see the micro-batches of each step (no
    one-pass warning) and the adapted layers get curvature estimates."""
    args = _args(tmp_path, optim="cblr_adam", optim_args="trust=30", learning_rate=0.01, per_device_train_batch_size=4,
                 gradient_accumulation_steps=3, max_steps=6)
    trainer = CBLRTrainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset(24))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.train()
    stats = find_optimizer(trainer.optimizer).layer_stats()
    estimated = [name for name, layer in stats.items() if layer["curvature"] > 0]
    assert "bert.encoder.layer.0.attention.self.query.weight" in estimated
