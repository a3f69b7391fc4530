"""Every fenced code block of README.md does what the README says (issue 11).

Each block is run, or listed as not run with the reason; a block or command that is neither fails
:func:`test_every_block_is_run_or_listed`, as does an entry below that no longer matches the README.

**Python blocks** (:data:`PYTHON_BLOCKS`): each is recognized by a line it contains, executed as it is written, with
the names it uses but does not define supplied by its fixture namespace (:func:`use_namespace` and the others:
``model`` a tiny BERT or a tiny Llama built from a config, ``train``/``dataset``/``loader``/``tokenizer`` small
generated data, from ``tests/workers/tiny.py`` and ``tests/workers/trl_worker.py``), in a temporary working folder
(the blocks write ``"out"``). Then what the README says of the block is checked: the layer statistics it names, the
batch-size plan its schedule promises (a ramp that ramps), the dropped share of each pool, the optimizer and its lr.

**Shell blocks**: split into commands (``&&`` chains and ``\\`` continuations resolved; comments dropped). Each
command is in :data:`RUN_COMMANDS` (run from a temporary folder that links ``scripts/`` and ``configs/``, with
``python`` the test's interpreter) or in :data:`NOT_RUN` with the reason. Before running:

- the large model is replaced by a tiny one: :data:`MODEL_SUBSTITUTIONS` (the script's default, all-MiniLM-L6-v2,
  becomes ``--tiny_model``: a 2-layer BERT of width 32 with the MiniLM tokenizer);
- a Hub dataset is replaced by local files with the same columns (:data:`DATASET_SUBSTITUTIONS`; the tests run
  offline), and the data files that a command names (``sst2/*.tsv``) are written from the package's generated
  sentiment sentences (:func:`write_sst2_files`);
- :data:`SHORT_RUN` and the command's number of steps are appended (a log every step, a small evaluation).

A run's checks read the run's own files (``train_results.json``, ``trainer_state.json``, the card, checkpoints).
The python blocks take a few seconds each; the script runs are marked ``slow`` (about 10 s each on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainerCallback, TrainerControl
from workers.tiny import IndexedDataset, tiny_bert

from hf_cblr.data import sentiment_examples
from hf_cblr.integrations import find_optimizer

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")


# -- the README's blocks -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    """One fenced code block: its language, its code and the README line of its first code line."""

    language: str
    code: str
    line: int


def readme_blocks() -> list[Block]:
    """Every fenced (```) block of README.md, in order."""
    text = README.read_text(encoding="utf-8")
    return [Block(match["language"], match["code"], text.count("\n", 0, match.start("code")) + 1)
            for match in re.finditer(r"^```(?P<language>[\w-]*)\n(?P<code>.*?)^```\s*$", text, flags=re.MULTILINE | re.DOTALL)]


def shell_commands(block: Block) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped, ``&&`` chains split."""
    joined = re.sub(r"\\\n\s*", " ", block.code)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            commands += [" ".join(part.split()) for part in line.split("&&")]
    return commands


def python_block(marker: str) -> Block:
    """The python block that contains the line ``marker``."""
    found = [block for block in readme_blocks() if block.language == "python" and marker in block.code.splitlines()]
    assert len(found) == 1, f"{len(found)} python blocks of README.md contain the line {marker!r}"
    return found[0]


def run_python_block(block: Block, namespace: dict[str, Any], substitutions: dict[str, str]) -> dict[str, Any]:
    """Execute ``block`` in ``namespace`` (its fixtures), each key of ``substitutions`` in its code replaced by the value;
    return the namespace with what the block defined."""
    code = block.code
    for old, new in substitutions.items():
        assert old in code, f"README.md line {block.line}: the substitution of {old!r} no longer applies"
        code = code.replace(old, new)
    exec(compile(code, f"{README}:{block.line}", "exec"), namespace)
    return namespace


# -- the python blocks: fixtures and checks -----------------------------------------------------------------
def token_dataset(num_samples: int, length: int = 8, seed: int = 0) -> Any:
    """A ``datasets.Dataset`` of ``num_samples`` random token sequences of ``length`` ids (< 100, tiny BERT's vocabulary)
    and binary labels: a stand-in for a tokenized training set."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    return Dataset.from_dict({"input_ids": torch.randint(1, 100, (num_samples, length), generator=generator).tolist(),
                              "labels": torch.randint(0, 2, (num_samples,), generator=generator).tolist()})


def use_namespace() -> dict[str, Any]:
    """``## Use``: ``model`` a tiny BERT classifier; ``loader`` 3 large batches, each a list of 4 micro-batches of 8."""
    data = IndexedDataset(n=90)
    loader = [[data.batch(list(range(start + 8 * k, start + 8 * (k + 1)))) for k in range(4)] for start in (0, 32, 58)]
    return {"model": tiny_bert(), "loader": loader}


def check_use(namespace: dict[str, Any]) -> None:
    """The optimizer stepped, and ``layer_stats()`` has the curvature and rate of each layer by parameter name."""
    stats = namespace["optimizer"].layer_stats()
    layer = stats["bert.encoder.layer.0.attention.self.query.weight"]
    assert math.isfinite(layer["curvature"]) and math.isfinite(layer["rate"]) and layer["rate"] > 0
    assert all(value["rate"] > 0 for value in stats.values())


def trainer_namespace() -> dict[str, Any]:
    """``## Hugging Face and DeepSpeed``: ``model`` a tiny BERT; ``train`` 2,048 sequences of 8 tokens, so that 3 epochs
    (6,144 samples) get past the ramp (4 x 256 + 4 x 512 = 3,072 samples) to the full batch of 1,024."""
    return {"model": tiny_bert(), "train": token_dataset(2048)}


def training_logs(trainer: Any) -> list[dict[str, float]]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def check_large_batch_trainer(namespace: dict[str, Any]) -> None:
    """"a global batch of 64 x 16 = 1024, reached by a ramp" (list:256*4,512*4,1024), the learning rate scaled by
    sqrt(B / 1024) on the ramp, 10% of each micro-step's pool dropped, MCLR on the Adam direction at trust 1.0."""
    trainer = namespace["trainer"]
    plan = trainer.batch_ramp.plan
    assert plan[:8] == [256] * 4 + [512] * 4 and len(plan) > 8 and set(plan[8:]) == {1024}
    assert trainer.state.global_step == len(plan)
    optimizer = find_optimizer(trainer.optimizer)
    assert type(optimizer).__name__ == "MCLR" and optimizer.base == "adam"
    assert optimizer.defaults["lr"] == 6.3e-4 and optimizer.defaults["trust"] == 1.0
    logs = training_logs(trainer)
    # the first step's lr: 6.3e-4 x sqrt(256 / 1024) = 0.5 x, times the linear decay (<= 1)
    assert 0.4 < logs[0]["learning_rate"] / 6.3e-4 <= 0.5
    # pools of 16, 32, 64 samples (the micro-steps): 1, 3, 6 dropped (floor(0.1 x size))
    assert all(entry["drop_fraction"] == 0.1 for entry in logs)
    assert all(0.89 < entry["kept_fraction"] < 0.95 for entry in logs)


def plain_trainer_namespace() -> dict[str, Any]:
    """The plain ``Trainer``: ``model`` a tiny BERT; ``train`` 1,024 sequences (one step per epoch at the batch of 1,024)."""
    return {"model": tiny_bert(), "train": token_dataset(1024)}


def check_plain_trainer(namespace: dict[str, Any]) -> None:
    """A plain Trainer trains with the named hf_cblr optimizer, at the training arguments' lr."""
    trainer = namespace["trainer"]
    optimizer = find_optimizer(trainer.optimizer)
    assert type(optimizer).__name__ == "MCLR" and optimizer.base == "adam"
    assert optimizer.defaults["lr"] == 6.3e-4 and optimizer.defaults["trust"] == 1.0
    assert trainer.state.global_step == 3


def trl_namespace() -> dict[str, Any]:
    """``### trl``: ``model`` a tiny Llama, ``tokenizer`` its word-level tokenizer, ``dataset`` 192 generated texts in a
    "text" column, so that 3 epochs (576 samples) get past the ramp (8 x 16 + 8 x 32 = 384 samples) to the batch of 64."""
    pytest.importorskip("trl", reason="the trl extra")
    from workers.trl_worker import corpus, tiny_llama, tokenizer

    return {"model": tiny_llama(), "tokenizer": tokenizer(), "dataset": corpus(192)}


def check_trl(namespace: dict[str, Any]) -> None:
    """The ramp list:16*8,32*8,64 and "1 of the first steps' 4" dropped: every pool (micro-step) of 4, 8 or 16
    samples drops a quarter, so a quarter of the samples seen is dropped; mclr_adam at its recommended lr 5e-4."""
    trainer = namespace["trainer"]
    plan = trainer.batch_ramp.plan
    assert plan[:16] == [16] * 8 + [32] * 8 and len(plan) > 16 and set(plan[16:]) == {64}
    optimizer = find_optimizer(trainer.optimizer)
    assert type(optimizer).__name__ == "MCLR" and optimizer.base == "adam" and optimizer.defaults["lr"] == 5e-4
    logs = training_logs(trainer)
    assert logs and all(entry["kept_fraction"] == 0.75 for entry in logs)


@dataclass(frozen=True)
class PythonBlock:
    """How to run one python block: its fixture namespace, its checks, and the replacements in its code on a machine
    without CUDA (as the README says where the block needs one)."""

    namespace: Callable[[], dict[str, Any]]
    check: Callable[[dict[str, Any]], None]
    cpu_substitutions: dict[str, str] = field(default_factory=dict)


#: python block (a line it contains) -> its fixtures and checks.
PYTHON_BLOCKS = {
    'optimizer = hf_cblr.create_optimizer(model, "cblr_adam", lr=5e-4, weight_decay=0.01)  # groups by name':
        PythonBlock(use_namespace, check_use),
    "from hf_cblr import CBLRTrainer, CBLRTrainingArguments": PythonBlock(trainer_namespace, check_large_batch_trainer),
    "from transformers import Trainer, TrainingArguments": PythonBlock(plain_trainer_namespace, check_plain_trainer),
    # trl's default bf16 needs a GPU, or use_cpu=True (the README says so)
    "from hf_cblr import CBLRSFTConfig, CBLRSFTTrainer": PythonBlock(
        trl_namespace, check_trl, cpu_substitutions={'CBLRSFTConfig("out", ': 'CBLRSFTConfig("out", use_cpu=True, '}),
}


class LogEveryStep(TrainerCallback):
    """Has the Trainer log after every optimizer step (the blocks keep the default ``logging_steps``), so that the checks
    read each step's learning rate, batch size and kept fraction in ``state.log_history``."""

    def on_step_end(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> None:
        control.should_log = True


@pytest.mark.parametrize("marker", list(PYTHON_BLOCKS), ids=["use", "cblr_trainer", "plain_trainer", "trl"])
def test_python_block(marker: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.trainer

    monkeypatch.chdir(tmp_path)
    # Every Trainer that the block builds starts with these callbacks (transformers.Trainer.__init__).
    monkeypatch.setattr(transformers.trainer, "DEFAULT_CALLBACKS", [*transformers.trainer.DEFAULT_CALLBACKS, LogEveryStep])
    spec = PYTHON_BLOCKS[marker]
    substitutions = {} if torch.cuda.is_available() else spec.cpu_substitutions
    spec.check(run_python_block(python_block(marker), spec.namespace(), substitutions))


# -- the shell commands -------------------------------------------------------------------------------
#: command (as the README writes it, whitespace normalized) -> why it is not run here.
NOT_RUN = {
    "scripts/install.sh": "installs packages into the active environment (and from PyPI)",
    "scripts/install.sh dev": "installs packages into the active environment (and from PyPI)",
    "python -m pytest -q": "the whole test suite, this file included",
    "accelerate launch --config_file configs/accelerate/cpu_2proc.yaml scripts/finetune.py":
        "tests/test_accelerate_launch.py launches scripts/finetune.py with every file of configs/accelerate/, this one "
        "included, on a tiny model",
}
#: What the script's default model (or a model a command names) becomes: Hub id -> the arguments that replace it and the
#: name of the replacement in the output folder's name.
MODEL_SUBSTITUTIONS = {"sentence-transformers/all-MiniLM-L6-v2": (["--tiny_model"], "tiny-bert")}
#: Hub dataset arguments -> local files with the same columns ("sentence", "label"), written by write_sst2_files.
DATASET_SUBSTITUTIONS = {"--dataset_name glue --dataset_config_name sst2":
                         "--train_file sst2/train.tsv --validation_file sst2/dev.tsv"}
#: Appended to every script run (with ``--max_steps``, the run's): a log every step, the probes every 4 steps, a small
#: evaluation.
SHORT_RUN = ["--logging_steps", "1", "--probe_interval", "4", "--max_eval_samples", "64", "--disable_tqdm", "true"]


def write_sst2_files(folder: Path) -> None:
    """``sst2/train.tsv``, ``sst2/train_4096.tsv`` and ``sst2/dev.tsv`` in SST-2's columns, from the package's generated
    sentiment sentences (512 training and 256 validation sentences; the 4,096-sample file repeats the 512)."""
    (folder / "sst2").mkdir()

    def write(name: str, rows: list[tuple[str, int]]) -> None:
        lines = ["sentence\tlabel", *(f"{sentence}\t{label}" for sentence, label in rows)]
        (folder / "sst2" / name).write_text("\n".join(lines) + "\n", encoding="utf-8")

    write("train.tsv", sentiment_examples("train"))
    write("train_4096.tsv", sentiment_examples("train") * 8)
    write("dev.tsv", sentiment_examples("validation"))


def run_script_command(command: str, folder: Path, max_steps: int) -> Path:
    """Run ``command`` (``python scripts/finetune.py ...``) from ``folder`` with the substitutions, :data:`SHORT_RUN` and
    ``max_steps`` steps; return the run's output folder (the one it creates under ``outputs/``)."""
    for hub_arguments, local_arguments in DATASET_SUBSTITUTIONS.items():
        command = command.replace(hub_arguments, local_arguments)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "scripts/finetune.py"], command
    model_arguments = [] if "--model_name_or_path" in argv else MODEL_SUBSTITUTIONS["sentence-transformers/all-MiniLM-L6-v2"][0]
    for name in ("scripts", "configs"):
        (folder / name).symlink_to(ROOT / name)
    write_sst2_files(folder)
    result = subprocess.run([sys.executable, *argv[1:], *model_arguments, *SHORT_RUN, "--max_steps", str(max_steps)],
                            cwd=folder, capture_output=True, text=True, timeout=600, env=script_environment(folder))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.count("Final metrics") == 1
    (output_dir,) = (folder / "outputs").iterdir()
    return output_dir


def script_environment(folder: Path) -> dict[str, str]:
    """Offline, one thread, no GPU, a fresh Hugging Face cache in ``folder``."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(folder / "hf_home"),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def logged(output_dir: Path, key: str) -> list[float]:
    """The values of ``key`` in the run's training logs, step by step."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry and "loss" in entry]


def check_default_run(output_dir: Path) -> None:
    """The first command: MCLR on the Adam direction with a batch ramp and dropping, on the generated data; the model,
    its card, the probe log and plots in outputs/<model>-synthetic-sentiment-mclr_adam/, a checkpoint every quarter of
    the run, the last two kept. The ramp (linear:8,8,512 to the full batch of 32) grows by 8 every 512 / 3 samples:
    22 steps of 8 (176 samples), then 16; the drop fraction reaches the recipe's 25% at the last step (4 of 16)."""
    tiny_name = MODEL_SUBSTITUTIONS["sentence-transformers/all-MiniLM-L6-v2"][1]
    assert output_dir.name == f"{tiny_name}-synthetic-sentiment-mclr_adam"
    results = json.loads((output_dir / "train_results.json").read_text())
    assert results["optimizer"] == "mclr_adam" and results["optimizer_class"] == "hf_cblr.optim.mclr.MCLR"
    assert logged(output_dir, "global_batch_size") == [8] * 22 + [16] * 2  # the ramp ramps
    kept = logged(output_dir, "kept_fraction")  # dropping warms up over 10 steps, then grows to 25% at the last step
    assert kept[0] == 1.0 and kept[-1] == 0.75
    for name in ("model.safetensors", "README.md", "structure_probes.jsonl", "eval_results.json"):
        assert (output_dir / name).is_file(), name
    assert any((output_dir / "probe_plots").iterdir())
    assert sorted(path.name for path in output_dir.glob("checkpoint-*")) == ["checkpoint-18", "checkpoint-24"]
    assert "MCLR" in (output_dir / "README.md").read_text()


def recipe_check(optim: str, first_batches: list[int]) -> Callable[[Path], None]:
    """The run trained ``optim`` (the recipe's), with the recipe's ramp: ``first_batches`` as its first global batches."""

    def check(output_dir: Path) -> None:
        results = json.loads((output_dir / "train_results.json").read_text())
        assert results["optimizer"] == optim
        assert logged(output_dir, "global_batch_size")[:len(first_batches)] == first_batches
        assert "eval_accuracy" in json.loads((output_dir / "eval_results.json").read_text())

    return check


#: command (as the README writes it, whitespace normalized) -> (its number of steps, the checks of its run).
RUN_COMMANDS: dict[str, tuple[int, Callable[[Path], None]]] = {
    "python scripts/finetune.py": (24, check_default_run),
    "python scripts/finetune.py configs/recipes/lamb.yaml --dataset_name glue --dataset_config_name sst2":
        (3, recipe_check("lamb", [8, 8, 8])),
    "python scripts/finetune.py configs/recipes/cblr_adam.yaml --train_file sst2/train.tsv --validation_file sst2/dev.tsv":
        (3, recipe_check("cblr_adam", [8, 8, 8])),
    "python scripts/finetune.py configs/recipes/large_batch.yaml --train_file sst2/train_4096.tsv "
    "--validation_file sst2/dev.tsv": (5, recipe_check("mclr_adam", [256] * 4 + [512])),  # 256 (4 steps) -> 512
}


@pytest.mark.slow
@pytest.mark.parametrize("command", list(RUN_COMMANDS), ids=["default", "lamb", "cblr_adam", "large_batch"])
def test_shell_command(command: str, tmp_path: Path) -> None:
    max_steps, check = RUN_COMMANDS[command]
    check(run_script_command(command, tmp_path, max_steps))


# -- accounting ---------------------------------------------------------------------------------------
def test_every_block_is_run_or_listed() -> None:
    """Every python block has an entry in PYTHON_BLOCKS and every shell command one in RUN_COMMANDS or NOT_RUN; every
    entry matches the README (a changed command must be checked again)."""
    blocks = readme_blocks()
    assert blocks, "README.md has fenced code blocks"
    markers_found: list[str] = []
    commands_found: list[str] = []
    for block in blocks:
        where = f"README.md line {block.line}"
        if block.language == "python":
            markers = [marker for marker in PYTHON_BLOCKS if marker in block.code.splitlines()]
            assert len(markers) == 1, (f"{where}: a python block that tests/test_readme.py does not run; add it to "
                                       f"PYTHON_BLOCKS (a line it contains, its fixtures and checks)")
            markers_found += markers
        elif block.language in SHELL_LANGUAGES:
            for command in shell_commands(block):
                assert command in RUN_COMMANDS or command in NOT_RUN, (
                    f"{where}: the command {command!r} is neither run (RUN_COMMANDS) nor listed with the reason (NOT_RUN) "
                    "in tests/test_readme.py")
                commands_found.append(command)
        else:
            raise AssertionError(f"{where}: a block in language {block.language!r}; tests/test_readme.py runs python and "
                                 f"shell ({', '.join(SHELL_LANGUAGES)}) blocks: give it one of these or handle it")
    assert sorted(markers_found) == sorted(PYTHON_BLOCKS), "each PYTHON_BLOCKS entry matches one block"
    stale = sorted((RUN_COMMANDS.keys() | NOT_RUN.keys()) - set(commands_found))
    assert not stale, f"entries of tests/test_readme.py that match no README command: {stale}"


@pytest.mark.parametrize("new_block", ["```python\nprint('a new example')\n```\n",
                                       "```bash\npython scripts/finetune.py --a_new_flag\n```\n",
                                       "```yaml\noptim: cblr\n```\n"], ids=["python", "bash", "yaml"])
def test_a_new_block_that_is_neither_run_nor_listed_fails(new_block: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text(encoding="utf-8") + "\n" + new_block, encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "README", readme)
    with pytest.raises(AssertionError, match=r"README\.md line \d+: (a python block|the command|a block in language)"):
        test_every_block_is_run_or_listed()
