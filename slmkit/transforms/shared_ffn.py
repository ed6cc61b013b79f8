"""MobiLLaMA-style shared FFN (Thawakar et al., 2024) made from a pretrained checkpoint.

MobiLLaMA trains one FFN shared by all blocks from scratch. slmkit makes a pretrained model share: the
blocks of each group of ``group_size`` consecutive blocks (all blocks by default) use one FFN, while
attention and norms stay per block. The shared FFN starts from the originals by one of:

- ``important``: the FFN of the group's most important block, the one writing the most into the
  residual stream (largest mean ‖FFN_l(x)‖ over calibration tokens, x its own inputs);
- ``average``: the element-wise mean of the group's FFN weights;
- ``merge``: the weights minimising the group's output error on calibration data,
  ``mean_l ‖FFN(X_l) − FFN_l(X_l)‖² / ‖FFN_l(X_l)‖²`` (X_l: block l's FFN inputs), found by Adam from the
  group member whose FFN alone has the lowest such error.

``rank`` > 0 adds per-block low-rank corrections ``B_l A_l`` to each shared projection, initialised to the
best rank-r approximation (SVD) of the block's own weight minus the shared one, and trained with the
shared weights in ``merge``. The shared weights are stored once (in memory and on disk): parameters
really fall. The result is an :class:`slmkit.SlmForCausalLM` with ``ffn_groups``.

The math (the FFN, the error, the SVD split) is in pure tensor functions; the model walking is below it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from slmkit import calib as calibration
from slmkit.config import BaseConfig, check_choice, check_range, check_type, register
from slmkit.errors import SlmkitError
from slmkit.eval.report import parameter_count
from slmkit.models.arch import blocks, get_module, get_spec, intermediate_size
from slmkit.models.modeling import (attach_shared_mlps, become_slm, build_shared_mlps, set_model_config,
                                   to_slm_config)
from slmkit.models.record import get_record
from slmkit.transforms.base import consecutive_groups, require_dense_llama, require_transformable

INITS = ("important", "average", "merge")


@dataclasses.dataclass
class SharedFFNConfig(BaseConfig):
    """Blocks share FFN weights: one FFN for all blocks, or one per group of consecutive blocks."""

    name = "shared_ffn"
    category = "transform"

    group_size: int | None = None  # consecutive blocks per shared FFN; None: every block shares one
    init: str = "merge"  # "important", "average" or "merge" (see the module docstring)
    rank: int = 0  # rank of per-block low-rank corrections of the shared projections (0: none)
    # Calibration tokens kept per block (its FFN inputs) for scoring and merging; memory: 2 × sample_tokens
    # × hidden × 4 bytes per block of the group being made (inputs and targets). On SmolLM2 a merge fit on
    # 4,096 tokens per block reached 0.07 relative error on them but 0.22 on other tokens: keep more.
    sample_tokens: int = 16384
    merge_steps: int = 300  # Adam steps of the merge (init "merge"), cosine-decayed learning rate
    merge_lr: float = 2e-3  # on SmolLM2 (pairs of blocks): 5e-5 left 0.64 error after 100 steps, 2e-3 0.07
    merge_batch: int = 512  # tokens per block in each merge step
    batch_size: int = 8  # calibration sequences per forward pass
    max_seq_len: int = 2048
    device: str | None = None  # where blocks are calibrated and the merge runs (default: the model's device)
    seed: int = 0  # merge minibatch sampling

    def __post_init__(self):
        if self.group_size is not None:
            check_range("group_size", self.group_size, 1, 1 << 20, int)
        check_choice("init", self.init, INITS)
        check_range("rank", self.rank, 0, 1 << 16, int)
        check_range("sample_tokens", self.sample_tokens, 1, 1 << 24, int)
        check_range("merge_steps", self.merge_steps, 0, 1 << 24, int)
        check_range("merge_lr", self.merge_lr, 0.0, 1.0)
        check_range("merge_batch", self.merge_batch, 1, 1 << 24, int)
        check_range("batch_size", self.batch_size, 1, 65536, int)
        check_range("max_seq_len", self.max_seq_len, 16, 1 << 20, int)
        check_range("seed", self.seed, 0, 2**63 - 1, int)
        if self.device is not None:
            check_type("device", self.device, str)


# --- math on tensors -----------------------------------------------------------------------------------


@dataclasses.dataclass
class FFNWeights:
    """A SwiGLU FFN's weights (float32): gate and up (ffn, hidden), down (hidden, ffn)."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate, up, down)."""
        return self.gate, self.up, self.down


def ffn_forward(x: torch.Tensor, weights: FFNWeights, act: Callable) -> torch.Tensor:
    """``down(act(gate x) · up x)`` for token rows x (tokens, hidden)."""
    return (act(x @ weights.gate.t()) * (x @ weights.up.t())) @ weights.down.t()


def relative_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖output − target‖² / ‖target‖² (0 = exact)."""
    return (output - target).pow(2).sum() / target.pow(2).sum().clamp(min=1e-30)


def average_weights(members: list[FFNWeights]) -> FFNWeights:
    """Element-wise mean of several FFNs' weights."""
    return FFNWeights(*(torch.stack(parts).mean(dim=0) for parts in zip(*(m.tensors() for m in members))))


def low_rank_split(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B (out, r), A (r, in)) with B A the best rank-r approximation of ``delta`` (truncated SVD)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def corrected(shared: FFNWeights, corrections: tuple | None) -> FFNWeights:
    """The shared weights plus one block's low-rank corrections ((B, A) per projection, or None)."""
    if corrections is None:
        return shared
    return FFNWeights(*(w + b @ a for w, (b, a) in zip(shared.tensors(), corrections)))


def initial_corrections(shared: FFNWeights, own: FFNWeights, rank: int) -> tuple:
    """Per-projection (B, A) approximating ``own − shared`` at ``rank``."""
    return tuple(low_rank_split(o - s, rank) for s, o in zip(shared.tensors(), own.tensors()))


def group_error(shared: FFNWeights, inputs: list[torch.Tensor], targets: list[torch.Tensor], act: Callable,
                corrections: list | None = None) -> float:
    """Mean over a group's blocks of the shared FFN's relative output error on their calibration tokens."""
    errors = []
    with torch.no_grad():
        for index, (x, y) in enumerate(zip(inputs, targets)):
            weights = corrected(shared, corrections[index] if corrections else None)
            errors.append(float(relative_error(ffn_forward(x, weights, act), y)))
    return sum(errors) / len(errors)


def merge(start: FFNWeights, inputs: list[torch.Tensor], targets: list[torch.Tensor], act: Callable,
          config: SharedFFNConfig, corrections: list | None = None,
          desc: str = "merging FFNs") -> tuple[FFNWeights, list | None]:
    """Adam on the shared weights (and corrections) minimising the group's mean relative output error."""
    shared = [t.clone().requires_grad_(True) for t in start.tensors()]
    deltas = None
    if corrections is not None:
        deltas = [[(b.clone().requires_grad_(True), a.clone().requires_grad_(True)) for b, a in block]
                  for block in corrections]
    params = shared + [t for block in deltas or [] for pair in block for t in pair]
    optimizer = torch.optim.Adam(params, lr=config.merge_lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, config.merge_steps))
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    progress = tqdm(range(config.merge_steps), desc=desc, unit="step")
    for _ in progress:
        loss = 0.0
        for index, (x, y) in enumerate(zip(inputs, targets)):
            rows = torch.randint(0, x.shape[0], (min(config.merge_batch, x.shape[0]),), generator=generator)
            rows = rows.to(x.device)
            weights = corrected(FFNWeights(*shared), deltas[index] if deltas else None)
            loss = loss + relative_error(ffn_forward(x[rows], weights, act), y[rows])
        loss = loss / len(inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.set_postfix(error=f"{loss.detach().item():.4f}")
    final = FFNWeights(*(t.detach() for t in shared))
    if deltas is not None:
        deltas = [tuple((b.detach(), a.detach()) for b, a in block) for block in deltas]
    return final, deltas


# --- model walking -------------------------------------------------------------------------------------


def _mlp_of(model: nn.Module, block: nn.Module) -> nn.Module:
    return get_module(block, get_spec(model).down.rpartition(".")[0])


def _block_weights(model: nn.Module, block: nn.Module, device: torch.device) -> FFNWeights:
    spec = get_spec(model)
    return FFNWeights(*(get_module(block, name).weight.detach().to(device, torch.float32)
                        for name in (spec.gate, spec.up, spec.down)))


class _GroupWalk(calibration.StatsCheckpoint):
    """The FFN-input walk's checkpoint: a block counts as finished only with its whole group.

    A group's FFN inputs stay in memory (they are large: 2 × sample_tokens × hidden floats per block), so a
    resumed walk starts at the first block of the first group whose shared FFN was not made, from the
    hidden states saved there. Each block's importance is its saved statistic.
    """

    def __init__(self, checkpoint: calibration.WalkCheckpoint, group_ends: set[int]):
        super().__init__(checkpoint.directory / "ffn-inputs", checkpoint.fingerprint, checkpoint.writer)
        self.group_ends = group_ends

    def save_block(self, model: nn.Module, index: int, block: nn.Module) -> None:
        """Record blocks 0..index as finished when ``index`` ends a group (its shared FFN is kept)."""
        if index in self.group_ends:
            super().save_block(model, index, block)

    def save_frontier(self, next_index: int, hidden_states: list[torch.Tensor]) -> None:
        """Keep the hidden states only at the start of a group, where a resumed walk starts."""
        if next_index - 1 in self.group_ends:
            super().save_frontier(next_index, hidden_states)


def _check_equal_widths(model: nn.Module, groups: list[int]) -> None:
    widths: dict[int, tuple[int, int]] = {}
    for index, group in enumerate(groups):
        width = intermediate_size(model.config, index)
        first = widths.setdefault(group, (index, width))
        if first[1] != width:
            raise SlmkitError(f"layers {first[0]} and {index} share an FFN but have FFN widths {first[1]} and "
                              f"{width}; shared FFNs need equal widths within a group")


def design_config(base_config, config: SharedFFNConfig):
    """The SlmConfig of a fresh model whose blocks share FFNs as ``config`` says."""
    require_dense_llama(base_config, "shared FFN")
    groups = consecutive_groups(base_config.num_hidden_layers, config.group_size)
    return to_slm_config(base_config, ffn_groups=groups, ffn_correction_rank=config.rank)


PROJECTIONS = ("gate", "up", "down")


def _group_tensors(shared: FFNWeights, corrections: list | None) -> dict[str, torch.Tensor]:
    """A group's result as named tensors (the shared weights, then each member's (B, A) per projection)."""
    tensors = dict(zip(PROJECTIONS, shared.tensors()))
    for member, block in enumerate(corrections or []):
        for projection, (b, a) in zip(PROJECTIONS, block):
            tensors[f"{member}.{projection}.b"], tensors[f"{member}.{projection}.a"] = b, a
    return tensors


def _group_from_tensors(tensors: dict[str, torch.Tensor], members: int, rank: int,
                        device: torch.device) -> tuple[FFNWeights, list | None]:
    """Inverse of :func:`_group_tensors`."""
    shared = FFNWeights(*(tensors[p].to(device) for p in PROJECTIONS))
    if not rank:
        return shared, None
    return shared, [tuple((tensors[f"{m}.{p}.b"].to(device), tensors[f"{m}.{p}.a"].to(device)) for p in PROJECTIONS)
                    for m in range(members)]


def _share_group(group: int, members: list[int], own: dict[int, FFNWeights], xs: list[torch.Tensor],
                 ys: list[torch.Tensor], importance: list[float], act: Callable,
                 config: SharedFFNConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """One group's shared FFN (and corrections) as named tensors, with its report entry."""
    entry: dict = {"layers": members}
    if config.init == "important":
        chosen = max(members, key=lambda i: importance[i])
        start, entry["source_layer"] = own[chosen], chosen
    elif config.init == "average":
        start = average_weights([own[i] for i in members])
    else:  # merge from the member whose FFN alone serves the group best
        candidates = {i: group_error(own[i], xs, ys, act) for i in members}
        chosen = min(candidates, key=candidates.get)
        start, entry["start_layer"] = own[chosen], chosen
    corrections = [initial_corrections(start, own[i], config.rank) for i in members] if config.rank else None
    entry["error_start"] = round(group_error(start, xs, ys, act, corrections), 6)
    if config.init == "merge" and config.merge_steps:
        start, corrections = merge(start, xs, ys, act, config, corrections, desc=f"merging FFN group {group}")
    entry["error"] = round(group_error(start, xs, ys, act, corrections), 6)
    return _group_tensors(start, corrections), entry


@register(SharedFFNConfig, needs_calibration=True, resumable=True)
def share_ffn(model: nn.Module, config: SharedFFNConfig, calib: torch.Tensor,
              checkpoint: calibration.WalkCheckpoint | None = None) -> nn.Module:
    """Make ``model``'s blocks share FFN weights in place (MobiLLaMA), initialised as ``config.init`` says.

    Walks the blocks once, group by group: a group's FFN inputs are sampled, its shared FFN made, and the
    inputs dropped before the next group's (only one group's inputs are in memory at a time).
    ``checkpoint``: each group's shared FFN is kept there once made, and the walk's hidden states after a
    recent group, so an interrupted run resumes at the first group it had not finished (running only the
    finished blocks after the saved hidden states, to rebuild that group's inputs).
    """
    require_transformable(model, "shared FFN")
    layers = blocks(model)
    groups = consecutive_groups(len(layers), config.group_size)
    _check_equal_widths(model, groups)
    smallest = min(model.config.hidden_size, *(intermediate_size(model.config, i) for i in range(len(layers))))
    if config.rank >= smallest:
        raise SlmkitError(f"rank {config.rank} is not below the smallest projection dimension ({smallest})")
    home = next(model.parameters())
    device = torch.device(config.device) if config.device else home.device
    act = _mlp_of(model, layers[0]).act_fn
    before = parameter_count(model)
    spec = get_spec(model)
    members_of = [[i for i, g in enumerate(groups) if g == group] for group in range(max(groups) + 1)]
    walk = _GroupWalk(checkpoint, {members[-1] for members in members_of}) if checkpoint is not None else None

    def kept_group(group: int, make: Callable[[], tuple[dict, dict]]) -> tuple[dict[str, torch.Tensor], dict]:
        return calibration.cached_tensors(checkpoint, f"ffn-group-{group:04d}", make)

    def missing() -> tuple[dict, dict]:
        raise SlmkitError(f"{checkpoint.directory}: a finished group's shared FFN is missing; delete the "
                          f"directory to start the transform over")

    done = walk.completed() if walk is not None else 0
    importance = [float(walk.load_stats(i)["importance"]) for i in range(done)]
    results = [kept_group(group, missing) for group in range(groups[done - 1] + 1)] if done else []

    tokens = calibration.cap_length(calib, config.max_seq_len)
    sampler = calibration.row_sampler(config.sample_tokens, tokens.numel())
    inputs, targets, own = {}, {}, {}  # of the blocks of the group being made
    for layer in calibration.layerwise(model, tokens, config.batch_size, config.device, desc="FFN inputs",
                                       checkpoint=walk):
        index, group = layer.index, groups[layer.index]
        x = calibration.observe_inputs(layer, {"mlp": get_module(layer.block, spec.gate)}, sampler,
                                       keep_outputs=True)["mlp"].to(device)
        own[index] = _block_weights(model, layer.block, device)
        with torch.no_grad():
            inputs[index], targets[index] = x, ffn_forward(x, own[index], act)
        importance.append(float(targets[index].norm(dim=1).mean()))
        if walk is not None:
            walk.save_stats(index, {"importance": torch.tensor(importance[index], dtype=torch.float64)})
        members = members_of[group]
        if index == members[-1]:
            xs, ys = [inputs.pop(i) for i in members], [targets.pop(i) for i in members]
            results.append(kept_group(group, lambda: _share_group(group, members, own, xs, ys, importance, act,
                                                                  config)))
            own.clear()

    shared_weights, corrections, report = [], [], []
    for members, (tensors, entry) in zip(members_of, results):
        shared, group_corrections = _group_from_tensors(tensors, len(members), config.rank, device)
        shared_weights.append(shared)
        corrections += group_corrections or [None] * len(members)
        report.append(entry)

    _install(model, groups, config.rank, shared_weights, corrections, home)
    get_record(model).metrics["shared_ffn"] = {
        "init": config.init, "groups": report, "importance": [round(v, 4) for v in importance],
        "params_before": before, "params_after": parameter_count(model),
    }
    return model


def _install(model: nn.Module, groups: list[int], rank: int, shared_weights: list[FFNWeights],
             corrections: list, like: torch.Tensor) -> None:
    """Replace the blocks' FFNs by shared ones holding ``shared_weights`` (and the corrections)."""
    new_config = to_slm_config(model.config, ffn_groups=groups, ffn_correction_rank=rank)
    set_model_config(model, new_config)
    if type(model).__name__ != "SlmForCausalLM":
        become_slm(model)
    shared = build_shared_mlps(new_config).to(like.device, like.dtype)
    with torch.no_grad():
        for mlp, weights in zip(shared, shared_weights):
            for linear, tensor in zip((mlp.gate_proj, mlp.up_proj, mlp.down_proj), weights.tensors()):
                linear.weight.copy_(tensor)
    attach_shared_mlps(get_module(model, get_spec(model).layers.rpartition(".")[0]), shared, groups, rank)
    if rank:
        with torch.no_grad():
            for block, block_corrections in zip(blocks(model), corrections):
                mlp = block.mlp
                for linear, (b, a) in zip((mlp.gate_proj, mlp.up_proj, mlp.down_proj), block_corrections):
                    linear.delta_b.copy_(b)
                    linear.delta_a.copy_(a)
