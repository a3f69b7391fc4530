"""The data-parallel world as ``torch.distributed`` sees it: one process when it is not initialized."""

from __future__ import annotations

import torch.distributed as dist


def world_size() -> int:
    """The number of ranks (1 without an initialized process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without an initialized process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
