"""torchrun worker: ``CBLRSFTTrainer`` (trl's ``SFTTrainer``) under DeepSpeed ZeRO-2 on 2 CPU ranks (gloo), fp32.

``python -m torch.distributed.run --standalone --nproc_per_node 2 trl_worker.py OUTPUT_DIR``

The runs of :data:`RUNS`, :data:`STEPS` steps each of ``mclr_adam`` on a tiny Llama and a generated text corpus: with
``SFTTrainer``'s own loss, and with small-loss dropping. Rank 0 writes ``OUTPUT_DIR/<run>.pt``: the parameters, the
layer statistics and the logged losses and gradient norms. The module also defines the tokenizer, corpus, model and
arguments, for ``tests/test_trl.py`` and its single-process references.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_cblr.integrations import find_optimizer
from hf_cblr.trainer.trl import CBLRSFTConfig, CBLRSFTTrainer

WORDS = ("the", "a", "one", "cat", "dog", "bird", "fox", "sees", "likes", "chases", "finds", "small", "big", "red", "blue",
         "old", "young", "quickly", "slowly", "and", "then", "runs", "sleeps")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")
STEPS = 3
GLOBAL_BATCH = 8
#: run -> the arguments it adds; mclr_adam's default estimator, secant_elementwise, runs on ZeRO partitions
RUNS: dict[str, dict[str, Any]] = {"sft_loss": {}, "dropping": {"drop_fraction": 0.25}}


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of :data:`WORDS`, built offline; ``</s>`` ends every text (``SFTTrainer`` adds it)."""
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *WORDS))}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def corpus(n: int = 48, seed: int = 0) -> Dataset:
    """``n`` texts of 3 to 12 random words (so batches are padded), in a ``"text"`` column."""
    rng = random.Random(seed)
    return Dataset.from_dict({"text": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]})


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Hidden size 32, 2 layers, the vocabulary of :func:`tokenizer`; eager attention (it has a double backward)."""
    config = LlamaConfig(vocab_size=len(SPECIAL_TOKENS) + len(WORDS), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, attn_implementation="eager")
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def training_args(output_dir: str, **kwargs: Any) -> CBLRSFTConfig:
    """fp32, no gradient checkpointing, the samples in order, a log every step; ``max_grad_norm`` so large that it never
    clips, but the gradient norm is logged (also without DeepSpeed)."""
    defaults: dict[str, Any] = dict(output_dir=output_dir, use_cpu=True, bf16=False, gradient_checkpointing=False,
                                    report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, max_grad_norm=1e6,
                                    train_sampling_strategy="sequential", optim="mclr_adam", learning_rate=1e-2)
    return CBLRSFTConfig(**{**defaults, **kwargs})


def train(args: CBLRSFTConfig, num_samples: int = STEPS * GLOBAL_BATCH) -> dict[str, Any]:
    """Train the tiny Llama on the first ``num_samples`` texts; its parameters, layer statistics and, per step, the
    logged loss and gradient norm."""
    trainer = CBLRSFTTrainer(model=tiny_llama(), args=args, train_dataset=corpus(num_samples), processing_class=tokenizer())
    trainer.train()
    return {"parameters": {name: param.detach().clone() for name, param in trainer.model.named_parameters()},
            "layer_stats": find_optimizer(trainer.optimizer).layer_stats(),
            **{key: [entry[key] for entry in trainer.state.log_history if "loss" in entry] for key in ("loss", "grad_norm")}}


def deepspeed_config() -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": 2}}


def main(output_dir: Path) -> None:
    from accelerate.state import AcceleratorState, PartialState

    world_size = int(os.environ["WORLD_SIZE"])
    for run, extra in RUNS.items():
        AcceleratorState._reset_state()
        PartialState._reset_state()
        args = training_args(str(output_dir / run), per_device_train_batch_size=GLOBAL_BATCH // world_size, max_steps=STEPS,
                             deepspeed=deepspeed_config(), **extra)
        result = train(args)
        if torch.distributed.get_rank() == 0:
            torch.save(result, output_dir / f"{run}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # a gloo thread can abort at interpreter exit
