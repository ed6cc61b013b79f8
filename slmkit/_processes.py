"""Which process writes, in a run started by ``accelerate launch`` or ``torchrun`` (one process otherwise).

Every process of such a run loads the model and walks the same calibration steps to the same result; only
the main process writes files (recipe checkpoints, the walks' finished blocks), and every process reads
them when a run resumes.
"""

from __future__ import annotations


def process_state(cpu: bool | None = None):
    """accelerate's process-wide ``PartialState``, started on the first call.

    ``cpu``: whether the run's processes compute on the CPU (None: when there is no CUDA device). accelerate
    counts the processes of a CPU run only when told so: otherwise each ``torchrun`` process of a CPU-only
    machine would see itself as the only one, and as the main one.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available() if cpu is None else cpu)


def is_main_process() -> bool:
    """False in the other processes of a multi-process run; True when there is one process."""
    return process_state().is_main_process


def wait_for_everyone() -> None:
    """Block until every process of the run gets here (nothing to wait for with one process)."""
    process_state().wait_for_everyone()
