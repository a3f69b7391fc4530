"""Small-loss dropping: the drop-fraction schedule, kept counts, top-k and rank-sampled selection, per-sample losses."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification, GPT2Config, GPT2LMHeadModel

from hf_cblr.trainer.sample_selection import (
    drop_fraction_at,
    num_kept,
    per_sample_loss,
    select_kept,
    select_sampled,
    select_topk,
)


def test_drop_fraction_schedule() -> None:
    assert [drop_fraction_at(s, 10, 0.2) for s in (0, 5, 9)] == [0.2, 0.2, 0.2]
    assert [drop_fraction_at(s, 10, 0.2, warmup_steps=4) for s in (0, 2, 4, 9)] == [0.0, 0.1, 0.2, 0.2]
    # After 2 warm-up steps, linear from 0.2 (step 2) to 0.6 (step 10, the last).
    assert drop_fraction_at(6, 11, 0.2, end=0.6, warmup_steps=2) == pytest.approx(0.4)
    assert drop_fraction_at(10, 11, 0.2, end=0.6, warmup_steps=2) == pytest.approx(0.6)
    assert drop_fraction_at(1, 11, 0.2, end=0.6, warmup_steps=2) == pytest.approx(0.1)


def test_num_kept() -> None:
    assert [num_kept(10, f) for f in (0.0, 0.25, 0.3, 0.5, 0.95)] == [10, 8, 7, 5, 1]
    assert num_kept(100, 0.29) == 71  # 0.29 * 100 is 28.999999999999996 in floating point
    assert num_kept(1, 0.9) == 1


def test_topk_keeps_the_largest_losses() -> None:
    losses = torch.tensor([0.3, 2.0, 0.1, 1.5, 0.7])
    assert select_topk(losses, 3).tolist() == [False, True, False, True, True]
    assert select_kept(losses, 0.4).tolist() == [False, True, False, True, True]
    assert select_kept(losses, 0.0).all()


def test_sampled_follows_selective_backprop_probabilities() -> None:
    """n = 2, k = 1: percentiles 1/4 and 3/4, exponent n/k - 1 = 1, so the larger loss is kept 3 times in 4."""
    generator = torch.Generator().manual_seed(0)
    losses = torch.tensor([5.0, 1.0])
    kept_large = sum(bool(select_sampled(losses, 1, generator)[0]) for _ in range(4000))
    assert kept_large / 4000 == pytest.approx(0.75, abs=0.03)


def test_sampled_is_reproducible_and_keeps_k() -> None:
    losses = torch.rand(50, generator=torch.Generator().manual_seed(1))
    first = select_kept(losses, 0.3, "sampled", torch.Generator().manual_seed(7))
    again = select_kept(losses, 0.3, "sampled", torch.Generator().manual_seed(7))
    assert int(first.sum()) == 35 and torch.equal(first, again)
    assert select_kept(losses, 0.0, "sampled", torch.Generator().manual_seed(7)).all()
    with pytest.raises(ValueError, match=r"drop_selection='best' is not valid; valid values: \['topk', 'sampled'\]"):
        select_kept(losses, 0.3, "best")


def _bert(num_labels: int, **config: object) -> BertConfig:
    return BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                      max_position_embeddings=16, num_labels=num_labels, **config)


@pytest.mark.parametrize(("num_labels", "labels"), [
    (3, torch.tensor([0, 2, 1, 1])),
    (1, torch.tensor([0.5, -1.0, 2.0, 0.0])),
    (3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])),
], ids=["single_label", "regression", "multi_label"])
def test_sequence_losses_average_to_the_model_loss(num_labels: int, labels: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert(num_labels)).eval()
    outputs = model(input_ids=torch.randint(0, 50, (4, 6)), labels=labels)
    losses = per_sample_loss(outputs.logits, labels, problem_type=model.config.problem_type)
    assert losses.shape == (4,)
    assert losses.mean().item() == pytest.approx(outputs.loss.item(), rel=1e-5)
    # The problem type is inferred the same way when not given.
    assert torch.allclose(per_sample_loss(outputs.logits, labels), losses)


def test_token_losses_are_per_sample_means_over_labelled_tokens() -> None:
    torch.manual_seed(0)
    model = BertForTokenClassification(_bert(4)).eval()
    labels = torch.tensor([[0, 1, -100, 2], [3, -100, -100, -100], [-100, -100, -100, -100]])
    logits = model(input_ids=torch.randint(0, 50, (3, 4))).logits
    losses = per_sample_loss(logits, labels)
    token = functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    assert losses.tolist() == pytest.approx([token[0, [0, 1, 3]].mean().item(), token[1, 0].item(), 0.0], rel=1e-5)


def test_causal_lm_shift_matches_the_model_loss_per_sample() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    input_ids = torch.randint(0, 50, (2, 6))
    logits = model(input_ids=input_ids).logits
    losses = per_sample_loss(logits, input_ids, shift_labels=True)
    for i in range(2):
        assert losses[i].item() == pytest.approx(model(input_ids=input_ids[i:i + 1], labels=input_ids[i:i + 1]).loss.item(),
                                                 rel=1e-5)
