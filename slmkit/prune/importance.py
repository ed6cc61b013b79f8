"""Importance of structures (attention heads, FFN channels, hidden channels, whole blocks) for pruning.

- :func:`activation_scores` (Minitron, Muralidharan et al., 2024): the energy of the activations each
  structure produces or reads, from one layer-by-layer calibration pass (one block on the device).
- :func:`taylor_scores`: first-order Taylor ``Σ_n (Σ w · ∂L_n/∂w)²``, each structure's estimated loss
  change per calibration sequence, squared and summed, from one full-model backward pass per sequence
  (needs the whole model and its gradients in memory; resumable per batch).
- :func:`block_influence` (ShortGPT, Men et al., 2024): ``1 − cos(block input, block output)``, mean over
  tokens; a block that barely changes its input matters little.
- :func:`block_loss_effect`: how much the calibration loss rises when a block is skipped.

Scores are "higher = more important". Model walking only; the math is in small tensor expressions.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from tqdm.auto import tqdm

from slmkit import calib as calibration
from slmkit.models.arch import attention_shape, blocks, get_module, get_spec, intermediate_size, weight_out_in


@dataclasses.dataclass
class WidthScores:
    """Per-layer head and FFN-channel scores and per-channel hidden scores (higher = keep)."""

    heads: list[torch.Tensor]  # per layer, (num_heads,)
    ffn: list[torch.Tensor]  # per layer, (intermediate_size,)
    hidden: torch.Tensor  # (hidden_size,)


def activation_scores(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8,
                      device: str | None = None,
                      checkpoint: calibration.StatsCheckpoint | None = None) -> WidthScores:
    """Minitron activation importance: head = ‖attention output of the head‖, FFN channel = ‖its
    activation into down_proj‖, hidden channel = ‖normed input of attention and MLP‖ summed over layers
    (L2 norms over all calibration tokens). One forward pass per block; ``checkpoint`` keeps each block's
    sums, so an interrupted walk resumes after its last finished block."""
    spec = get_spec(model)
    attn_inputs, _, mlp_inputs, _ = spec.input_groups()  # linears reading the normed hidden states

    def measure(layer: calibration.LayerCalibration) -> dict[str, torch.Tensor]:
        modules = {
            "attn_in": get_module(layer.block, attn_inputs[0]),
            "mlp_in": get_module(layer.block, mlp_inputs[0]),
            "o": get_module(layer.block, spec.o),
            "down": get_module(layer.block, spec.down),
        }
        return calibration.observe_inputs(layer, modules, calibration.sq_sum_reduce, keep_outputs=True)

    per_block = calibration.block_stats(model, tokens, measure, batch_size, device, desc="importance",
                                        checkpoint=checkpoint)
    heads, ffn, hidden = [], [], None
    for index, stats in enumerate(per_block):
        shape = attention_shape(model.config, index)
        heads.append(stats["o"].view(shape.num_heads, shape.head_dim).sum(dim=1).sqrt().cpu())
        ffn.append(stats["down"].sqrt().cpu())
        layer_hidden = (stats["attn_in"] + stats["mlp_in"]).cpu()
        hidden = layer_hidden if hidden is None else hidden + layer_hidden
    return WidthScores(heads, ffn, hidden.sqrt())


def _grad_out_in(module: nn.Module) -> torch.Tensor:
    grad = module.weight.grad
    return grad.t() if type(module).__name__ == "Conv1D" else grad


def _taylor_sums(model: nn.Module, spec) -> dict[str, torch.Tensor]:
    """Signed ``Σ w·g`` per structure for the gradients now in ``.grad`` (float64, on the CPU):
    ``heads-<i>`` and ``ffn-<i>`` per layer, ``hidden`` over every matrix that reads or writes it."""
    embed = get_module(model, spec.embed)
    hidden = (embed.weight.float() * embed.weight.grad.float()).sum(dim=0).double()
    sums = {}
    for index, block in enumerate(blocks(model)):
        shape = attention_shape(model.config, index)
        width = intermediate_size(model.config, index)
        contrib = {name: (weight_out_in(get_module(block, name)).float() * _grad_out_in(get_module(block, name)).float())
                   for name in spec.linear_names()}
        q = contrib[spec.qkv][: shape.q_rows] if spec.qkv else contrib[spec.q]
        o = contrib[spec.o]
        sums[f"heads-{index:04d}"] = q.reshape(shape.num_heads, -1).sum(1) + o.t().reshape(shape.num_heads, -1).sum(1)
        down = contrib[spec.down].sum(dim=0)
        if spec.gate_up:
            rows = contrib[spec.gate_up].sum(dim=1)
            sums[f"ffn-{index:04d}"] = rows[:width] + rows[width:] + down
        else:
            sums[f"ffn-{index:04d}"] = sum(contrib[n].sum(dim=1) for n in (spec.gate, spec.up) if n) + down
        for name, c in contrib.items():
            hidden = hidden + (c.sum(dim=1) if name in (spec.o, spec.down) else c.sum(dim=0)).double()
    sums["hidden"] = hidden
    return {key: value.detach().double().cpu() for key, value in sums.items()}


def taylor_scores(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8,
                  checkpoint: calibration.WalkCheckpoint | None = None) -> WidthScores:
    """First-order Taylor importance per structure: ``Σ_n (Σ w·∂L_n/∂w)²``, the inner sum over the
    structure's weights and ``L_n`` the LM loss of calibration sequence ``n``.

    ``Σ w·∂L_n/∂w`` is the first-order estimate of how much removing the structure changes sequence
    ``n``'s loss; its square is summed over the sequences (Molchanov et al., 2019). Each sequence gets its
    own backward pass: on a trained model the gradient summed over sequences nearly cancels, and ranking by
    ``|Σ_n Σ w·∂L_n/∂w|`` instead pruned much worse (measured on SmolLM2, FFN to 90% of the parameters:
    +100% perplexity against +27.5%). Needs the whole model and its gradients in memory.

    ``checkpoint`` keeps the sums of each ``batch_size`` sequences (``taylor-batch-<i>.safetensors``), so
    an interrupted run resumes after its last finished batch.
    """
    spec = get_spec(model)
    device = next(model.parameters()).device
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for param in model.parameters():
        param.requires_grad_(True)

    def batch_sums(start: int) -> tuple[dict[str, torch.Tensor], dict]:
        squares: dict[str, torch.Tensor] = {}
        for row in range(start, min(start + batch_size, tokens.shape[0])):
            sequence = tokens[row : row + 1].to(device)
            try:
                with torch.enable_grad():
                    model(input_ids=sequence, labels=sequence, use_cache=False).loss.backward()
                sums = _taylor_sums(model, spec)
            finally:
                model.zero_grad(set_to_none=True)
            squares = {key: squares[key] + value.square() if key in squares else value.square()
                       for key, value in sums.items()}
        return squares, {}

    try:
        total: dict[str, torch.Tensor] = {}
        starts = range(0, tokens.shape[0], batch_size)
        for index, start in enumerate(tqdm(starts, desc="taylor importance", unit="batch")):
            sums, _ = calibration.cached_tensors(checkpoint, f"taylor-batch-{index:05d}", lambda: batch_sums(start))
            total = {key: total[key] + value if key in total else value for key, value in sums.items()}
    finally:
        model.zero_grad(set_to_none=True)
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
    layers = range(len(blocks(model)))
    return WidthScores([total[f"heads-{i:04d}"].float() for i in layers],
                       [total[f"ffn-{i:04d}"].float() for i in layers], total["hidden"].float())


def block_influence(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8,
                    device: str | None = None,
                    checkpoint: calibration.StatsCheckpoint | None = None) -> torch.Tensor:
    """ShortGPT block influence per block: mean over tokens of ``1 − cos(input, output)``, shape (layers,).

    Each block runs once: its outputs are handed to the walk as the next block's inputs. ``checkpoint``
    keeps each block's score, so an interrupted walk resumes after its last finished block.
    """

    def measure(layer: calibration.LayerCalibration) -> dict[str, torch.Tensor]:
        outputs = layer.run()
        total, count = torch.zeros((), dtype=torch.float64), 0
        for x, y in zip(layer.hidden_states, outputs):
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)  # (B, T)
            total, count = total + (1 - cos).double().sum().cpu(), count + cos.numel()
        layer.outputs = outputs
        return {"influence": total / count}

    per_block = calibration.block_stats(model, tokens, measure, batch_size, device, desc="block influence",
                                        checkpoint=checkpoint)
    return torch.tensor([float(stats["influence"]) for stats in per_block])


def _skip_hook(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def block_loss_effect(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8,
                      checkpoint: calibration.WalkCheckpoint | None = None) -> torch.Tensor:
    """Rise of the mean calibration loss (nats/token) when each block alone is skipped, shape (layers,).

    ``checkpoint`` keeps the loss of the full model and each block's effect as they are measured, so an
    interrupted run measures only the blocks it had not finished.
    """
    device = next(model.parameters()).device

    def mean_loss() -> float:
        total = 0.0
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(device)
            total += float(model(input_ids=batch, labels=batch, use_cache=False).loss) * batch.shape[0]
        return total / tokens.shape[0]

    def skipped_loss(block: nn.Module) -> float:
        handle = block.register_forward_hook(_skip_hook, with_kwargs=True)
        try:
            return mean_loss()
        finally:
            handle.remove()

    with torch.no_grad():
        base = calibration.cached(checkpoint, "loss-base", mean_loss)
        effects = [calibration.cached(checkpoint, f"loss-skip-{index:04d}", lambda: skipped_loss(block)) - base
                   for index, block in enumerate(tqdm(blocks(model), desc="block loss effect", unit="block"))]
    return torch.tensor(effects)
