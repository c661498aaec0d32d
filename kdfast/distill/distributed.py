"""Multi-process runs (torchrun / accelerate launch): the main process prepares shared files first.

Scale-out is Trainer's (DDP); the pipeline only makes sure that windowing and the
teacher cache are computed once, by the main process, and read by the others.
"""
from __future__ import annotations

import contextlib
import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def main_process_first():
    """Run the body on the main process first, then on the others (a no-op in one process)."""
    if world_size() <= 1:
        yield
        return
    from accelerate import PartialState
    with PartialState().main_process_first():
        yield


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process (after the main one wrote a file the others read next)."""
    if world_size() <= 1:
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish() -> None:
    """Tear this process's process group down at the end of a command (each rank on its own: no
    collective, so a rank that finishes while the main one still evaluates does not wait). A rank
    that exits with the gloo group alive can abort in its connection threads at interpreter exit
    ("terminate called without an active exception"), which fails the whole torchrun job."""
    if world_size() <= 1:
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
