r"""The fused step's CPU kernels, built from ``csrc/fused_cpu.cpp`` on first use.

Inductor compiles the fused kernels of :mod:`hf_cblr.optim._tensor_ops` on any device, but on the CPU it does not put a
reduction and the in-place stores of the same elements in one loop: Adam's reduction pass reads ``g, m, v, w`` twice
(8 passes instead of 6) and runs at about half the memory bandwidth of torch's fused AdamW (``docs/benchmarks.md``,
"The fused step"). These kernels do each layer in exactly one loop, vectorized for the CPU's instruction set (the one
torch dispatches to, ``torch.backends.cpu.get_cpu_capability()``), with the same arithmetic as the Python kernels.

They are built once per machine and source with ``torch.utils.cpp_extension.load`` (a C++ compiler and ``ninja``; about
25 seconds) into ``TORCH_EXTENSIONS_DIR``, and loaded from there afterwards (0.1 s). Where the build fails, the reason
is logged at INFO and the fused path runs Inductor's kernels instead (``fused=True``), or the foreach kernels (the
default, ``fused=None``): either way the step runs what it was asked for, so no warning.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "fused_cpu.cpp"
#: Compiler flags per ``torch.backends.cpu.get_cpu_capability()``: the instruction set torch's own CPU kernels use here.
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma", "-mprefer-vector-width=512"],
    "AVX2": ["-mavx2", "-mfma"],
}
#: ``-fno-math-errno`` lets ``sqrt`` vectorize (no errno to set); it changes no result.
BASE_FLAGS = ["-O3", "-fno-math-errno", "-fopenmp"]


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The built kernels, or None (the reason logged once, at INFO) where they cannot be built."""
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        from torch.utils import cpp_extension

        logger.info("hf_cblr: loading the fused step's CPU kernels (built once per machine: about 25 s)")
        return cpp_extension.load(
            name=f"hf_cblr_fused_cpu_{capability.lower()}", sources=[str(SOURCE)],
            extra_cflags=BASE_FLAGS + ISA_FLAGS.get(capability, []), extra_ldflags=["-fopenmp"])
    except Exception as error:  # any build or load failure: other kernels run instead
        logger.info("hf_cblr: the fused step's C++ CPU kernels cannot be built here (%s: %s); the fused path runs "
                    "Inductor's kernels, the default path the foreach kernels", type(error).__name__,
                    str(error).splitlines()[0][:200] if str(error) else "")
        return None
