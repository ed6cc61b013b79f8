"""Lossless storage of sparse tensors: the non-zero values plus a bitmask of where they are.

A tensor with sparsity ``s`` and ``b`` bytes per element takes ``(1 - s)·b + 1/8`` bytes per element
this way instead of ``b``: a 2:4 fp16 weight shrinks to 56%, a 50% unstructured fp32 one to 53%. The
format is the same for N:M and unstructured sparsity and independent of GPU sparse-kernel layouts
(cuSPARSELt/CUTLASS metadata is device specific, so it is built at load time, never stored).
"""

from __future__ import annotations

import math

import torch

_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
MIN_ELEMENTS = 4096  # smaller tensors are never worth a second entry in the file
MAX_RATIO = 0.9  # compress only when it saves at least 10%


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor → uint8 bytes, 8 flags per byte, most significant bit first (flattened, zero padded)."""
    flat = mask.flatten().to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` flags as a flat bool tensor."""
    flags = (bits[:, None] >> _SHIFTS.to(bits.device)) & 1
    return flags.flatten()[:count].bool()


def bitmask_bytes(tensor: torch.Tensor) -> int:
    """Bytes the bitmask form of ``tensor`` takes (values + bitmask)."""
    nonzero = int(torch.count_nonzero(tensor))
    return nonzero * tensor.element_size() + (tensor.numel() + 7) // 8


def should_compress(tensor: torch.Tensor) -> bool:
    """Whether storing ``tensor`` as values + bitmask saves at least 10% (large numeric tensors only)."""
    if tensor.numel() < MIN_ELEMENTS or tensor.dtype == torch.bool or tensor.is_complex():
        return False
    return bitmask_bytes(tensor) < MAX_RATIO * tensor.numel() * tensor.element_size()


def compress(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, bitmask): the non-zeros in row-major order and where they are."""
    flat = tensor.detach().flatten()
    mask = flat != 0
    return flat[mask].contiguous(), pack_bits(mask)


def decompress(values: torch.Tensor, bitmask: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Rebuild the dense tensor of ``shape`` from :func:`compress`'s output (exact)."""
    count = math.prod(shape)
    mask = unpack_bits(bitmask, count)
    if int(mask.sum()) != values.numel():
        raise ValueError(f"bitmask marks {int(mask.sum())} values but {values.numel()} are stored")
    flat = torch.zeros(count, dtype=values.dtype, device=values.device)
    flat[mask] = values
    return flat.view(*shape)
