"""Batch-size schedules: grammar, values keyed to consumed samples, plans, LR factors and the batch sampler."""

from __future__ import annotations

from collections import Counter

import pytest
from accelerate.data_loader import BatchSamplerShard

from hf_cblr.trainer.batch_schedule import (
    LinearRamp,
    Milestones,
    ScheduledBatchSampler,
    StepList,
    batch_size_plan,
    consumed_samples,
    lr_scale,
    parse_batch_size_schedule,
    validate_batch_size_schedule,
)


def test_parse_each_kind() -> None:
    assert parse_batch_size_schedule("linear:32,32,1_000") == LinearRamp(32, 32, 1000)
    assert parse_batch_size_schedule("milestones: 0=32, 10000=64,50000=128") == Milestones(((0, 32), (10000, 64), (50000, 128)))
    assert parse_batch_size_schedule("list:8,16*3,32") == StepList((8, 16, 16, 16, 32))


@pytest.mark.parametrize(("spec", "message"), [
    ("ramp:1,2,3", "kinds"),
    ("linear", "kinds"),
    ("linear:32,32", "START,INCREMENT,RAMP_SAMPLES"),
    ("linear:32,0,100", "INCREMENT must be >= 1"),
    ("linear:a,32,100", "START 'a' is not an integer"),
    ("milestones:10=32,20=64", "start at 0"),
    ("milestones:0=32,0=64", "strictly increase"),
    ("milestones:0:32", "is not SAMPLES=BATCH"),
    ("list:8,0", "batch size must be >= 1"),
    ("list:8*0", "repeat count must be >= 1"),
])
def test_parse_errors_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_batch_size_schedule(spec)


def _megatron(consumed: int, start: int, increment: int, ramp: int, full: int) -> int:
    """Megatron-LM's RampupBatchsizeNumMicroBatchesCalculator.update, float arithmetic and all."""
    if consumed > ramp:
        return full
    per_increment = ramp / ((full - start) // increment)
    return start + int(consumed / per_increment) * increment


def test_linear_matches_megatron_rampup() -> None:
    ramp = LinearRamp(start=16, increment=16, ramp_samples=300)
    for consumed in range(0, 400, 7):
        assert ramp.global_batch_size(consumed, 0, 64) == _megatron(consumed, 16, 16, 300, 64)
    # 3 increments over 300 samples: one every 100.
    assert [ramp.global_batch_size(c, 0, 64) for c in (0, 99, 100, 199, 200, 299, 300, 301)] == [16, 16, 32, 32, 48, 48, 64, 64]


def test_milestones_and_list_values() -> None:
    milestones = Milestones(((0, 8), (100, 16), (250, 32)))
    assert [milestones.global_batch_size(c, 0, 32) for c in (0, 99, 100, 249, 250, 10**6)] == [8, 8, 16, 16, 32, 32]
    steps = StepList((4, 8, 8))
    assert [steps.global_batch_size(0, k, 32) for k in range(5)] == [4, 8, 8, 8, 8]


def test_validation_against_full_batch_and_divisor() -> None:
    validate_batch_size_schedule(LinearRamp(8, 8, 100), full_batch_size=32, multiple_of=4)
    with pytest.raises(ValueError, match="multiple of world_size x gradient_accumulation_steps = 4"):
        validate_batch_size_schedule(Milestones(((0, 6), (10, 32))), full_batch_size=32, multiple_of=4)
    with pytest.raises(ValueError, match=r"at most .* = 32"):
        validate_batch_size_schedule(StepList((8, 64)), full_batch_size=32, multiple_of=4)
    with pytest.raises(ValueError, match="INCREMENT must divide 32 - START"):
        validate_batch_size_schedule(LinearRamp(8, 10, 100), full_batch_size=32, multiple_of=2)
    with pytest.raises(ValueError, match="START must be <= 32"):
        validate_batch_size_schedule(LinearRamp(64, 8, 100), full_batch_size=32, multiple_of=2)


def test_plan_by_steps_and_by_samples() -> None:
    ramp = LinearRamp(4, 4, 24)  # full 16: 4 while c < 8, 8 while c < 16, 12 while c <= 24, then 16
    assert batch_size_plan(ramp, 16, max_steps=7) == [4, 4, 8, 12, 16, 16, 16]
    plan = batch_size_plan(ramp, 16, total_samples=60)
    assert plan == [4, 4, 8, 12, 16, 16] and consumed_samples(plan) == [0, 4, 8, 16, 28, 44, 60]
    assert batch_size_plan(ramp, 16, total_samples=61)[-1] == 16 and sum(batch_size_plan(ramp, 16, total_samples=61)) == 76
    with pytest.raises(ValueError, match="exactly one"):
        batch_size_plan(ramp, 16)


def test_lr_scale() -> None:
    assert lr_scale(8, 32, "none") == 1.0
    assert lr_scale(8, 32, "linear") == 0.25
    assert lr_scale(8, 32, "sqrt") == 0.5
    with pytest.raises(ValueError, match="valid values"):
        lr_scale(8, 32, "cubic")


def test_sampler_follows_the_plan_and_covers_each_epoch_once() -> None:
    plan = [4, 8, 12, 12, 12]  # 48 samples of a 20-sample set: epochs 0, 1 and 8 samples of epoch 2
    sampler = ScheduledBatchSampler(20, plan, chunks_per_step=4, seed=3)
    chunks = list(sampler)
    assert len(chunks) == len(sampler) == 20
    assert [len(chunk) for chunk in chunks] == [1] * 4 + [2] * 4 + [3] * 12
    stream = [index for chunk in chunks for index in chunk]
    assert sorted(stream[:20]) == list(range(20)) and sorted(stream[20:40]) == list(range(20))
    assert max(Counter(stream[40:]).values()) == 1
    assert stream[:20] != list(range(20)) and stream[:20] != stream[20:40]  # shuffled, differently per epoch
    assert list(ScheduledBatchSampler(20, plan, chunks_per_step=4, seed=3)) == chunks
    in_order = [i for chunk in ScheduledBatchSampler(20, plan, 4, shuffle=False) for i in chunk]
    assert in_order[:24] == [*range(20), 0, 1, 2, 3]


def test_sampler_rejects_sizes_not_divisible() -> None:
    with pytest.raises(ValueError, match=r"\[6\] are not positive multiples of 4"):
        ScheduledBatchSampler(20, [4, 6], chunks_per_step=4)


@pytest.mark.parametrize("world_size", [1, 2])
def test_accelerate_shards_give_each_rank_its_micro_batches(world_size: int) -> None:
    """Chunk i * world_size + r of a step is micro-batch i of rank r, as BatchSamplerShard deals them."""
    accumulation = 2
    plan = [8, 16, 16]
    sampler = ScheduledBatchSampler(40, plan, chunks_per_step=world_size * accumulation, seed=0)
    chunks = list(sampler)
    for rank in range(world_size):
        shard = list(BatchSamplerShard(sampler, num_processes=world_size, process_index=rank))
        assert len(shard) == len(plan) * accumulation
        for step in range(len(plan)):
            for micro in range(accumulation):
                expected = chunks[(step * accumulation + micro) * world_size + rank]
                assert shard[step * accumulation + micro] == expected
                assert len(expected) == plan[step] // (world_size * accumulation)


def test_sampler_with_lengths_sorts_each_global_batch_and_keeps_its_samples() -> None:
    lengths = [(7 * i) % 11 for i in range(20)]
    plan = [8, 8, 8, 8, 8]
    plain = list(ScheduledBatchSampler(20, plan, chunks_per_step=2, seed=1))
    grouped = list(ScheduledBatchSampler(20, plan, chunks_per_step=2, seed=1, lengths=lengths))
    for step in range(len(plan)):
        plain_step, grouped_step = plain[2 * step] + plain[2 * step + 1], grouped[2 * step] + grouped[2 * step + 1]
        assert sorted(plain_step) == sorted(grouped_step)
        assert [lengths[i] for i in grouped_step] == sorted((lengths[i] for i in grouped_step), reverse=True)
    with pytest.raises(ValueError, match="lengths has 3 entries for 20 samples"):
        ScheduledBatchSampler(20, plan, chunks_per_step=2, lengths=[1, 2, 3])
