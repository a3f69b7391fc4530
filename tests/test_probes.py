"""The structure-probe callback against hand computations, in real ``transformers.Trainer`` runs on a tiny BERT."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

from hf_cblr import CBLR
from hf_cblr.diagnostics import PROBES_FILE, StructureProbeCallback, load_probes
from hf_cblr.diagnostics.plot import main as plot_main

SEQ_LEN = 8
TOTAL_KEYS = {"loss_before", "loss_after", "loss_change", "abs_loss_change", "grad_norm", "update_norm", "probe_grad_norm",
              "grad_dot_update", "curvature"}


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[dict[str, Tensor]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.examples[index]


def make_examples(count: int, seed: int) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (count, SEQ_LEN), generator=generator)
    labels = (ids[:, 0] > 25).long()  # learnable from the first token
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long), "labels": labels[i]}
            for i in range(count)]


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                        max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config)


def training_args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    options: dict[str, Any] = dict(
        output_dir=str(output_dir), use_cpu=True, report_to=[], per_device_train_batch_size=4, max_steps=4,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=100, save_strategy="no", seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


class Recorder(TrainerCallback):
    """Copies weights and gradients around the optimizer steps ``steps``, and the optimizer's layer stats."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps
        self.before: dict[int, dict[str, Tensor]] = {}
        self.grads: dict[int, dict[str, Tensor]] = {}
        self.after: dict[int, dict[str, Tensor]] = {}
        self.layer_stats: dict[int, dict[str, dict[str, float]]] = {}
        self.lr: dict[int, float] = {}

    def on_pre_optimizer_step(self, args, state, control, model, **kwargs):
        if state.global_step + 1 in self.steps:
            self.before[state.global_step + 1] = {n: p.detach().clone() for n, p in model.named_parameters()}
            self.grads[state.global_step + 1] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    def on_optimizer_step(self, args, state, control, model, optimizer, **kwargs):
        step = state.global_step + 1
        if step in self.steps:
            self.after[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
            inner = optimizer.optimizer  # Accelerate's AcceleratedOptimizer wraps the Trainer's optimizer
            if isinstance(inner, CBLR):
                self.layer_stats[step] = inner.layer_stats()
                self.lr[step] = inner.param_groups[0]["lr"]


class LogSpy(TrainerCallback):
    """A reporting integration stand-in: keeps every ``logs`` dict it is given."""

    def __init__(self) -> None:
        self.logs: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def norm(tensors: list[Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def check_against_hand_computation(record: dict[str, Any], recorder: Recorder, model: nn.Module,
                                   probe_batch: dict[str, Tensor]) -> None:
    """Recompute the record's numbers from the recorded tensors and a copy of the model."""
    step = record["step"]
    before, after, grads = recorder.before[step], recorder.after[step], recorder.grads[step]
    names = list(before)
    layers, total = record["layers"], record["total"]
    assert set(layers) == set(names)
    updates = {n: after[n].double() - before[n].double() for n in names}
    for n in names:
        assert layers[n]["grad_norm"] == pytest.approx(norm([grads[n]]), rel=1e-5, abs=1e-9)
        assert layers[n]["update_norm"] == pytest.approx(norm([updates[n]]), rel=1e-4, abs=1e-9)
    assert total["grad_norm"] == pytest.approx(norm(list(grads.values())), rel=1e-5)
    assert total["update_norm"] == pytest.approx(norm(list(updates.values())), rel=1e-4)
    assert total["update_norm"] > 0

    reference = copy.deepcopy(model)
    reference.eval()
    with torch.no_grad():
        for n, p in reference.named_parameters():
            p.copy_(before[n])
    reference.zero_grad()
    loss_before = reference(**probe_batch).loss
    loss_before.backward()
    probe_grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in reference.named_parameters()}
    with torch.no_grad():
        for n, p in reference.named_parameters():
            p.copy_(after[n])
        loss_after = reference(**probe_batch).loss
    change = loss_after.item() - loss_before.item()
    assert total["loss_before"] == pytest.approx(loss_before.item(), rel=1e-6)
    assert total["loss_after"] == pytest.approx(loss_after.item(), rel=1e-6)
    assert total["loss_change"] == pytest.approx(change, rel=1e-4, abs=1e-7)
    assert total["abs_loss_change"] == pytest.approx(abs(change), rel=1e-4, abs=1e-7)
    assert total["probe_grad_norm"] == pytest.approx(norm(list(probe_grads.values())), rel=1e-5)
    dot = sum(float((probe_grads[n].double() * updates[n]).sum()) for n in names)
    assert total["grad_dot_update"] == pytest.approx(dot, rel=1e-4, abs=1e-7)
    expected_curvature = 2 * (change - dot) / total["update_norm"] ** 2
    assert total["curvature"] == pytest.approx(expected_curvature, rel=1e-3, abs=1e-6)


def test_adamw_probes_match_hand_computation_with_clipping_and_accumulation(tmp_path: Path) -> None:
    model = tiny_bert()
    probe_batch = default_data_collator(make_examples(6, seed=1))
    probe = StructureProbeCallback(probe_batch, probe_interval=2)
    recorder = Recorder({2, 4})
    args = training_args(tmp_path, optim="adamw_torch", gradient_accumulation_steps=2, max_grad_norm=0.05)
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(make_examples(32, seed=0)),
                      callbacks=[probe, recorder])
    trainer.train()

    records = load_probes(tmp_path / PROBES_FILE)
    assert [r["step"] for r in records] == [2, 4]
    assert records == probe.records
    for record in records:
        assert record["global_batch_size"] == 8
        assert set(record["total"]) == TOTAL_KEYS
        assert all(set(layer) == {"grad_norm", "update_norm", "probe_grad_norm"} for layer in record["layers"].values())
        check_against_hand_computation(record, recorder, trainer.model, probe_batch)

    # The probe steps became logging steps; the Trainer logs the norm before clipping, the probe the clipped one.
    logs = {entry["step"]: entry for entry in trainer.state.log_history if "loss" in entry}
    assert sorted(logs) == [2, 4]
    for record in records:
        entry = logs[record["step"]]
        assert entry["grad_norm"] > 0.05
        assert record["total"]["grad_norm"] == pytest.approx(0.05, rel=1e-4)
        for key in ("grad_norm", "update_norm", "loss_change", "curvature"):
            assert entry[f"probe/{key}"] == record["total"][key]
        assert not any(key.count("/") > 1 for key in entry)  # no per-layer scalars by default


@pytest.fixture(scope="module")
def cblr_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CBLR run with the default probe batch, per-layer logging, and the callback attached before a reporter."""
    output_dir = tmp_path_factory.mktemp("cblr_run")
    model = tiny_bert()
    dataset = ListDataset(make_examples(32, seed=0))
    optimizer = CBLR(model.parameters(), lr=0.05, momentum=0.9, trust=0.01, curvature="secant")  # one backward per step
    probe = StructureProbeCallback(probe_interval=2, log_per_layer=True)
    recorder, spy = Recorder({2, 4, 6}), LogSpy()
    trainer = Trainer(model=model, args=training_args(output_dir, max_steps=6), train_dataset=dataset,
                      optimizers=(optimizer, None), callbacks=[spy, recorder])
    probe.attach(trainer)
    trainer.train()
    return {"dir": output_dir, "trainer": trainer, "probe": probe, "recorder": recorder, "spy": spy,
            "probe_batch": default_data_collator([dataset[i] for i in range(4)])}


def test_cblr_probes_add_layer_curvature_rate_and_lr(cblr_run: dict[str, Any]) -> None:
    trainer, recorder = cblr_run["trainer"], cblr_run["recorder"]
    names = [n for n, _ in trainer.model.named_parameters()]
    records = load_probes(cblr_run["dir"] / PROBES_FILE)
    assert [r["step"] for r in records] == [2, 4, 6]
    for record in records:
        # the default probe batch: the first per_device_train_batch_size examples, collated
        check_against_hand_computation(record, recorder, trainer.model, cblr_run["probe_batch"])
        stats, lr = recorder.layer_stats[record["step"]], recorder.lr[record["step"]]
        for j, name in enumerate(names):  # CBLR names the layers of model.parameters() "group0.<index>"
            layer = record["layers"][name]
            assert layer["curvature"] == stats[f"group0.{j}"]["curvature"]
            assert layer["rate"] == stats[f"group0.{j}"]["rate"]
            assert layer["lr"] == pytest.approx(lr * stats[f"group0.{j}"]["rate"], rel=1e-12)
    weight = "bert.encoder.layer.0.attention.self.query.weight"
    assert records[-1]["layers"][weight]["curvature"] > 0
    assert records[-1]["layers"][weight]["rate"] != 1.0


def test_attached_probe_scalars_reach_the_reporters_per_layer(cblr_run: dict[str, Any]) -> None:
    weight = "bert.encoder.layer.0.attention.self.query.weight"
    seen = [logs for logs in cblr_run["spy"].logs if "probe/grad_norm" in logs]
    assert len(seen) == 3
    for logs, record in zip(seen, cblr_run["probe"].records, strict=True):
        assert logs["probe/curvature"] == record["total"]["curvature"]
        for key in ("grad_norm", "update_norm", "curvature", "rate", "lr"):
            assert logs[f"probe/{weight}/{key}"] == record["layers"][weight][key]


def test_plot_command_writes_png_figures(cblr_run: dict[str, Any]) -> None:
    written = plot_main([str(cblr_run["dir"])])  # default --out: <run dir>/probe_plots
    expected = {"totals.png", "layers_grad_norm.png", "layers_update_norm.png", "layers_curvature.png", "layers_lr.png"}
    assert {path.name for path in written} == expected
    for path in written:
        assert path.parent == cblr_run["dir"] / "probe_plots"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000


def test_probes_leave_training_unchanged(tmp_path: Path) -> None:
    """The probe passes use eval mode, no random numbers and no .grad: the weights end bit-identical."""
    final = []
    for callbacks in ([], [StructureProbeCallback(probe_interval=1)]):
        trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path / str(len(callbacks)), max_steps=3),
                          train_dataset=ListDataset(make_examples(32, seed=0)), callbacks=callbacks)
        trainer.train()
        assert trainer.model.training
        final.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})
    assert all(torch.equal(final[0][n], final[1][n]) for n in final[0])


def test_resume_keeps_records_up_to_the_checkpoint_and_a_fresh_run_starts_over(tmp_path: Path) -> None:
    def run(resume: str | None = None, max_steps: int = 3) -> None:
        args = training_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2)
        trainer = Trainer(model=tiny_bert(), args=args, train_dataset=ListDataset(make_examples(32, seed=0)),
                          callbacks=[StructureProbeCallback(probe_interval=1)])
        trainer.train(resume_from_checkpoint=resume)

    run()
    first = load_probes(tmp_path / PROBES_FILE)
    run(resume=str(tmp_path / "checkpoint-2"))
    resumed = load_probes(tmp_path / PROBES_FILE)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed[:2] == first[:2]
    assert resumed[2]["total"]["loss_before"] == pytest.approx(first[2]["total"]["loss_before"], rel=1e-5)
    run(max_steps=1)
    assert [r["step"] for r in load_probes(tmp_path / PROBES_FILE)] == [1]


def test_records_are_valid_json_lines(cblr_run: dict[str, Any]) -> None:
    lines = (cblr_run["dir"] / PROBES_FILE).read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        record = json.loads(line)
        assert set(record) == {"step", "global_batch_size", "total", "layers"}


@pytest.mark.parametrize("kwargs", [{"probe_interval": 0}, {"probe_interval": 2.0}, {"probe_batch_size": 0},
                                    {"probe_batch": {"input_ids": torch.ones(1, 2)}, "probe_batch_size": 3}])
def test_invalid_arguments_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        StructureProbeCallback(**kwargs)


def test_probe_batch_without_labels_fails_clearly(tmp_path: Path) -> None:
    probe = StructureProbeCallback({"input_ids": torch.ones(2, SEQ_LEN, dtype=torch.long)}, probe_interval=1)
    trainer = Trainer(model=tiny_bert(), args=training_args(tmp_path, max_steps=1),
                      train_dataset=ListDataset(make_examples(8, seed=0)), callbacks=[probe])
    with pytest.raises(ValueError, match="labels"):
        trainer.train()


# -- distributed: the module is also the torchrun worker script ---------------------------------------
DEEPSPEED_ZERO = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                  "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}


def distributed_worker(output_dir: str, backend: str) -> None:
    """Train the tiny model on each rank with ``backend`` (``ddp``, ``zero2``, ``zero3``); dump each rank's records."""
    deepspeed = None if backend == "ddp" else {**DEEPSPEED_ZERO, "zero_optimization": {"stage": int(backend[-1])}}
    args = training_args(Path(output_dir), max_steps=4, gradient_accumulation_steps=2, max_grad_norm=1.0,
                         ddp_backend="gloo", deepspeed=deepspeed)
    probe = StructureProbeCallback(probe_interval=2)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=ListDataset(make_examples(64, seed=0)), callbacks=[probe])
    trainer.train()
    rank = torch.distributed.get_rank()
    (Path(output_dir) / f"records_rank{rank}.json").write_text(json.dumps(probe.records))
    torch.distributed.destroy_process_group()


def run_distributed(tmp_path: Path, backend: str) -> list[list[dict[str, Any]]]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(Path(__file__).resolve().parents[1] / ".torch_extensions")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               str(tmp_path), backend]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return [json.loads((tmp_path / f"records_rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[dict[str, Any]]]]:
    output_dir = tmp_path_factory.mktemp("ddp_run")
    return output_dir, run_distributed(output_dir, "ddp")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_ranks_agree_and_only_rank_zero_writes(ddp_run: tuple[Path, list[list[dict[str, Any]]]]) -> None:
    output_dir, (rank0, rank1) = ddp_run
    assert [r["step"] for r in rank0] == [2, 4]
    assert load_probes(output_dir / PROBES_FILE) == rank0  # written once, by rank 0
    for record0, record1 in zip(rank0, rank1, strict=True):
        assert record0["global_batch_size"] == 4 * 2 * 2
        for key, value in record0["total"].items():  # all-reduced gradients, replicated weights
            assert value is not None
            assert record1["total"][key] == pytest.approx(value, rel=1e-5, abs=1e-8)


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_deepspeed_measures_the_update_made_inside_backward(tmp_path: Path, backend: str,
                                                            ddp_run: tuple[Path, list[list[dict[str, Any]]]]) -> None:
    """DeepSpeed steps in the last backward; the probe brackets it from on_step_begin and matches DDP's numbers
    (the same torch AdamW, clipping and data), without the training gradient (ZeRO's own buffers) and, under
    ZeRO-3 (partitioned weights), without any weight-based number."""
    pytest.importorskip("deepspeed")
    rank0, rank1 = run_distributed(tmp_path, backend)
    assert load_probes(tmp_path / PROBES_FILE) == rank0
    assert rank1 == rank0
    weight_based = {"grad_norm", "update_norm", "probe_grad_norm", "grad_dot_update", "curvature"}
    for record, ddp in zip(rank0, ddp_run[1][0], strict=True):
        assert record["step"] == ddp["step"]
        for key, value in record["total"].items():
            if key == "grad_norm" or (backend == "zero3" and key in weight_based):
                assert value is None
            else:
                assert value == pytest.approx(ddp["total"][key], rel=1e-4, abs=1e-7), key
        assert (record["layers"] == {}) == (backend == "zero3")


if __name__ == "__main__":
    distributed_worker(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    os._exit(0)  # a gloo thread can abort at interpreter exit
