"""A tiny BERT classifier and an in-memory dataset whose samples carry their own index, for the trainer tests."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import BertConfig, BertForSequenceClassification

#: Token ids below this are ordinary tokens; sample ``i`` starts with token ``INDEX_OFFSET + i``.
INDEX_OFFSET = 10


def tiny_bert(seed: int = 0, dropout: float = 0.0) -> BertForSequenceClassification:
    """Eager attention: the fused CPU kernels have no double backward (curvature='hvp').

    ``accepts_loss_kwargs = False``: the model's loss is a batch mean that ignores ``num_items_in_batch``, and the
    Trainer (transformers 5.24) would otherwise not divide it by the accumulation steps and multiply it by the world
    size, training on ``gradient_accumulation_steps x`` the mean gradient.
    """
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                        attn_implementation="eager")
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.accepts_loss_kwargs = False
    return model


class IndexedDataset(Dataset):
    """``n`` random token sequences with binary labels; sample ``i`` starts with token ``INDEX_OFFSET + i``."""

    def __init__(self, n: int = 24, length: int = 8, seed: int = 0) -> None:
        if n > 100 - INDEX_OFFSET:
            raise ValueError("at most 90 samples: their index is a token id")
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, INDEX_OFFSET, (n, length), generator=generator)
        self.input_ids[:, 0] = torch.arange(n) + INDEX_OFFSET
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[indices], "labels": self.labels[indices]}


def sample_indices(inputs: dict[str, Tensor]) -> list[int]:
    """The dataset indices of the samples of a collated batch."""
    return (inputs["input_ids"][:, 0] - INDEX_OFFSET).tolist()


def kept_mean_gradient(model: torch.nn.Module, dataset: IndexedDataset, pools: list[list[int]],
                       drop_fraction: float) -> dict[str, Tensor]:
    """By hand: in each pool keep the n - floor(f n) largest cross-entropies; the gradient of their mean."""
    model.zero_grad()
    kept_losses = []
    for pool in pools:
        losses = torch.nn.functional.cross_entropy(model(**{"input_ids": dataset.input_ids[pool]}).logits,
                                                   dataset.labels[pool], reduction="none")
        keep = len(pool) - int(drop_fraction * len(pool) + 1e-9)
        kept_losses.append(losses.sort(descending=True).values[:keep])
    torch.cat(kept_losses).mean().backward()
    return {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.grad is not None}
