"""The experiment behind the optimizers' default ``trust``: accuracy over a trust grid, against AdamW in the same run.

Each run is ``scripts/finetune.py`` (the packaged all-MiniLM-L6-v2 on the embedded sentiment dataset
by default, offline) with one optimizer and one ``trust`` on :data:`SWEEP_RECIPE`: a fixed batch, no
batch-size ramp and no small-loss dropping, so that only the optimizer differs; every run has the
same seed, data order and number of steps. Printed per run: validation accuracy and loss, and the accuracy
difference to AdamW at its learning rate in the same sweep. ``--json`` writes the rows.

    python benchmarks/defaults_sweep.py                                   # 13 runs, about 25 min on 2 CPU cores
    python benchmarks/defaults_sweep.py --optimizers cblr_adam --trusts 30 100 300
    python benchmarks/defaults_sweep.py -- --train_file train.tsv --validation_file dev.tsv --max_train_samples 2000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: The learning rate of each optimizer in the sweep: the base optimizer's, which the layers outside the
#: adaptation mask (biases, norm layers: rate 1) train with. CBLR's adapted layers step ``lr * trust / c_l``
#: times the base direction, so ``lr * trust`` is the fraction of each layer's Newton step taken: with the
#: Adam base's ``lr = 1e-4`` that fraction needs ``trust`` in the hundreds. MCLR's rate is relative to the median layer,
#: and so is that of the registry's ``cblr_adam`` (``rate_rule="median"``): their ``trust`` is dimensionless.
LEARNING_RATES = {"adamw_torch": 1e-4, "cblr": 0.1, "mclr": 0.1, "cblr_adam": 1e-4, "mclr_adam": 1e-4}
#: The trust grid of each optimizer (``--trusts`` replaces them all): lr * trust from 1e-3 to 0.1 for CBLR.
TRUSTS = {"cblr": (0.01, 0.1, 1.0), "mclr": (0.01, 0.1, 1.0), "cblr_adam": (0.3, 1.0, 3.0), "mclr_adam": (0.01, 0.1, 1.0)}
#: The recipe of every run (scripts/finetune.py's arguments): a fixed batch, no ramp, no dropping, no probes.
SWEEP_RECIPE = {"per_device_train_batch_size": 32, "lr_scheduler_type": "linear", "warmup_steps": 0.1,
                "weight_decay": 0.01, "eval_strategy": "no", "logging_steps": 1000, "probe_interval": 0}


def run(optimizer: str, trust: float | None, epochs: float, output: Path, extra: list[str]) -> dict[str, Any]:
    """One fine-tuning run; its evaluation metrics."""
    folder = output / (optimizer if trust is None else f"{optimizer}-trust{trust:g}")
    recipe = output / "sweep_recipe.json"
    recipe.write_text(json.dumps(SWEEP_RECIPE))
    command = [sys.executable, str(ROOT / "scripts" / "finetune.py"), str(recipe), "--optim", optimizer,
               "--learning_rate", str(LEARNING_RATES[optimizer]), "--num_train_epochs", str(epochs),
               "--output_dir", str(folder), *extra]
    if trust is not None:
        command += ["--optim_args", f"trust={trust:g}"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads((folder / "eval_results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", default=["cblr", "mclr", "cblr_adam", "mclr_adam"],
                        choices=[name for name in LEARNING_RATES if name != "adamw_torch"])
    parser.add_argument("--trusts", type=float, nargs="+", help="the trusts of every optimizer (default: TRUSTS)")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--output", type=Path, default=ROOT / "outputs" / "defaults_sweep")
    parser.add_argument("--json", type=Path, help="write the rows to this file")
    parser.add_argument("extra", nargs="*", help="after --: more arguments for scripts/finetune.py")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)

    rows = [{"optimizer": "adamw_torch", "trust": None, **run("adamw_torch", None, args.epochs, args.output, args.extra)}]
    print(f"{'optimizer':<12} {'lr':>7} {'trust':>6} {'accuracy':>9} {'loss':>8} {'- AdamW':>8}", flush=True)
    for optimizer in args.optimizers:
        for trust in args.trusts or TRUSTS[optimizer]:
            rows.append({"optimizer": optimizer, "trust": trust, **run(optimizer, trust, args.epochs, args.output, args.extra)})
            print(f"  ... {optimizer} trust={trust:g}: accuracy {rows[-1]['eval_accuracy']:.4f}", flush=True)
    reference = rows[0]["eval_accuracy"]
    for row in rows:
        trust = "-" if row["trust"] is None else f"{row['trust']:g}"
        print(f"{row['optimizer']:<12} {LEARNING_RATES[row['optimizer']]:>7g} {trust:>6} {row['eval_accuracy']:>9.4f} "
              f"{row['eval_loss']:>8.4f} {row['eval_accuracy'] - reference:>+8.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
