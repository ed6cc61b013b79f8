"""Pure tensor math of unstructured and N:M pruning: scores, masks and the SparseGPT update.

Every function takes and returns tensors; nothing here knows about models. A *mask* is a bool tensor
of the weight's shape, ``True`` where the weight is **pruned** (set to zero).

Weights are (out_features, in_features). N:M sparsity keeps at most ``N`` of every ``M`` consecutive
weights along the input dimension of each row (2:4: two of every four), the layout sparse tensor cores
accelerate.
"""

from __future__ import annotations

import torch

from slmkit.errors import SlmkitError


def parse_n_m(text: str) -> tuple[int, int]:
    """``"2:4"`` → (2, 4): keep N of every M. Raises ValueError for anything else."""
    try:
        n, m = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise ValueError(f"n_m must look like '2:4' (keep N of every M weights), got {text!r}") from None
    if not 0 < n < m:
        raise ValueError(f"n_m must have 0 < N < M, got {text!r}")
    return n, m


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the importance magnitude pruning ranks by."""
    return weight.float().abs()


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda importance |W_ij| · ‖X_j‖₂ (Sun et al., 2023); ``input_sq_sum`` is Σ_tokens x_j², shape (in,)."""
    return weight.float().abs() * input_sq_sum.float().clamp(min=0).sqrt()[None, :]


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Prune the ``sparsity`` fraction of lowest scores, within each row or over the whole matrix.

    Ties are broken by position (a stable sort), so the pruned count is exact.
    """
    if per_row:
        count = int(scores.shape[1] * sparsity)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        if count:
            order = torch.sort(scores, dim=1, stable=True).indices[:, :count]
            mask.scatter_(1, order, True)
        return mask
    count = int(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count:
        mask[torch.sort(scores.flatten(), stable=True).indices[:count]] = True
    return mask.view_as(scores)


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In each group of ``m`` consecutive inputs of each row, prune the ``m - n`` lowest scores."""
    rows, cols = scores.shape
    if cols % m:
        raise SlmkitError(f"N:M {n}:{m} needs in_features divisible by {m}, got {cols}")
    groups = scores.reshape(rows, cols // m, m)
    lowest = torch.sort(groups, dim=2, stable=True).indices[:, :, : m - n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True)
    return mask.reshape(rows, cols)


def is_n_m_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of ``m`` consecutive inputs of every row has at most ``n`` non-zeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    return bool(((weight.reshape(rows, cols // m, m) != 0).sum(dim=2) <= n).all())


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023): prune columns left to right, updating the remaining weights.

    Args:
        weight: (out, in) float weights (not modified).
        hessian: (in, in) ``X^T X`` summed over calibration tokens (any positive scale).
        sparsity: fraction pruned (ignored when ``n_m`` is given). The mask is chosen per block of
            ``block_size`` columns by ``w² / [H⁻¹]_jj²`` (adaptive mask selection).
        n_m: (N, M) to keep N of every M consecutive inputs instead.
        block_size: columns processed together (lazy batched updates).
        damp: dampening added to the Hessian diagonal, as a fraction of its mean.

    Returns:
        The pruned and updated (out, in) float32 weight. Pruned entries are exactly zero.
    """
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    try:
        h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise SlmkitError("SparseGPT: the calibration Hessian is not positive definite; raise damp") from None
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w_block = w[:, start:end].clone()
        h_block = h_inv[start:end, start:end]
        diag = torch.diag(h_block)
        errors = torch.zeros_like(w_block)
        if n_m is None:
            scores = w_block.pow(2) / diag[None, :].pow(2)
            mask = unstructured_mask(scores, sparsity, per_row=False)
        else:
            mask = torch.zeros_like(w_block, dtype=torch.bool)
        for i in range(end - start):
            if n_m is not None and i % n_m[1] == 0:
                group = slice(i, i + n_m[1])
                scores = w_block[:, group].pow(2) / diag[group][None, :].pow(2)
                mask[:, group] = n_m_mask(scores, *n_m)
            column = w_block[:, i]
            pruned = torch.where(mask[:, i], torch.zeros_like(column), column)
            error = (column - pruned) / h_block[i, i]
            w_block[:, i:] -= error[:, None] * h_block[i, i:][None, :]
            w_block[:, i] = pruned
            errors[:, i] = error
        w[:, start:end] = w_block
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return w
