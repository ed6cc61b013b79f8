"""When a Triton kernel can run: on CUDA tensors, or anywhere under ``TRITON_INTERPRET=1`` (the CPU
interpreter the tests use). Otherwise each op falls back to its PyTorch reference."""

from __future__ import annotations

import functools
import os
import re

import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # no Triton wheel for this platform: the PyTorch references serve
    HAVE_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = (re.findall(r"\d+", version) + ["0", "0"])[:2]
    return int(major), int(minor)


def interpreter_problem(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """Why Triton's CPU interpreter cannot run these kernels here (None: it can); default: installed versions.

    Triton before 3.7 turns loop bounds into 1-element arrays that NumPy 2.4 and later refuse to convert
    to ints, so every kernel with a loop fails deep inside the interpreter.
    """
    if triton_version is None or numpy_version is None:
        from numpy import __version__ as numpy_installed
        from triton import __version__ as triton_installed

        triton_version, numpy_version = triton_version or triton_installed, numpy_version or numpy_installed
    if _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter (TRITON_INTERPRET=1) cannot run with "
                f"NumPy {numpy_version}: install triton>=3.7 or numpy<2.4")
    return None


@functools.cache
def _check_interpreter() -> None:
    from slmkit.errors import SlmkitError

    problem = interpreter_problem()
    if problem:
        raise SlmkitError(problem)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the kernel path applies to these tensors (else the op uses its reference).

    Under ``TRITON_INTERPRET=1`` with a Triton/NumPy pair whose interpreter cannot run the kernels
    (:func:`interpreter_problem`), a one-line :class:`~slmkit.errors.SlmkitError` says which to change.
    """
    if not HAVE_TRITON:
        return False
    if all(t.is_cuda for t in tensors):
        return True
    if interpreting() and all(t.device.type == "cpu" for t in tensors):
        _check_interpreter()
        return True
    return False
