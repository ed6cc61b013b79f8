"""Layer-by-layer calibration: capture the inputs of block 0, then walk the blocks one at a time.

Calibration-based transforms (SmoothQuant, GPTQ, AWQ, Wanda, SparseGPT, activation importance) share
this walk::

    for layer in calib.layerwise(model, tokens):
        stats = calib.input_abs_max(layer, dict(arch.block_linears(model, layer.block)))
        ...change layer.block in place...
    # after the loop body, the walk runs the *changed* block to produce block i+1's inputs

Only one block (plus the captured activations) is on the calibration device at a time, so a model that
does not fit on the device can still be calibrated on it: peak device memory ≈ one block + activations.
Each block gets the masks and position embeddings the model's own forward passes it (they differ per
block where layers alternate attention types), captured once up front.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from slmkit.errors import SlmkitError
from slmkit.models.arch import blocks


class _StopForward(Exception):
    """Raised by the stand-in for the last block once every block's inputs are captured."""


@dataclasses.dataclass
class LayerCalibration:
    """One block during the walk, with the inputs it receives for every calibration batch.

    ``extra_args`` and ``kwargs`` are the ones the model hands *this* block: families whose layers
    alternate attention types (Gemma-2's sliding and full layers, Qwen2's sliding-window layers) pass
    each block its own mask, so they are captured per block (``per_block``) and switched by :meth:`at`.
    """

    index: int
    block: nn.Module
    hidden_states: list[torch.Tensor]  # one (B, T, hidden) tensor per batch
    extra_args: list[tuple]  # positional arguments after hidden_states, per batch
    kwargs: list[dict[str, Any]]  # keyword arguments (position embeddings, masks...), per batch
    per_block: list[tuple[list[tuple], list[dict[str, Any]]]] = dataclasses.field(default_factory=list, repr=False)

    def at(self, index: int, block: nn.Module) -> None:
        """Point at block ``index`` (``block``), with the arguments the model passes that block."""
        self.index, self.block = index, block
        if self.per_block:
            self.extra_args, self.kwargs = self.per_block[index]

    def run(self) -> list[torch.Tensor]:
        """Run the block on every captured batch and return its output hidden states."""
        with torch.no_grad():
            return [run_block(self.block, hidden, args, kwargs)
                    for hidden, args, kwargs in zip(self.hidden_states, self.extra_args, self.kwargs)]


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The output hidden states of ``block`` on one captured batch (blocks may return a tuple)."""
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _move_shell(model: nn.Module, skip: nn.Module, device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` except those inside ``skip`` to ``device``."""
    inside = {id(m) for m in skip.modules()}
    for module in model.modules():
        if id(module) not in inside:
            module._apply(lambda t: t.to(device), recurse=False)


class _InputProbe(nn.Module):
    """Stands in for a block during capture: records the arguments the model passes it, runs nothing.

    It returns its input hidden states unchanged (only block 0's are kept: later stand-ins record just
    the arguments, which the model computes before its loop) and answers attribute lookups it cannot
    (``attention_type``...) from the block it stands in for. The stand-in for the last block stops the
    forward, so neither the final norm nor the head runs.
    """

    def __init__(self, block: nn.Module, record: Callable[[tuple, dict], None], last: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: moving the probe moves nothing
        self._record, self._last = record, last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self._record((hidden_states, *args), kwargs)
        if self._last:
            raise _StopForward
        return hidden_states


def capture_block_inputs(
    model: nn.Module, tokens: torch.Tensor, batch_size: int, device: torch.device
) -> LayerCalibration:
    """Run the model's forward on every batch of ``tokens`` with its blocks stood in for; return block 0's
    inputs, with the arguments (masks, position embeddings...) the model passes each block in ``per_block``.

    No block runs: each is replaced by an :class:`_InputProbe` for the capture and put back after.
    """
    layers = blocks(model)
    captured = LayerCalibration(0, layers[0], [], [], [], per_block=[([], []) for _ in layers])

    def recorder(index):
        def record(args, kwargs):
            if index == 0:
                captured.hidden_states.append(args[0].detach())
            captured.per_block[index][0].append(tuple(args[1:]))
            captured.per_block[index][1].append(dict(kwargs))

        return record

    originals = list(layers)
    _move_shell(model, layers, device)
    try:
        for index, block in enumerate(originals):
            layers[index] = _InputProbe(block, recorder(index), last=index == len(originals) - 1)
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start : start + batch_size].to(device)  # (B, T)
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for index, block in enumerate(originals):
            layers[index] = block
    captured.at(0, originals[0])
    return captured


def layerwise(
    model: nn.Module,
    tokens: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    desc: str = "calibrating",
) -> Iterator[LayerCalibration]:
    """Yield each block with its calibration inputs; after each yield, propagate through the block.

    Args:
        model: the model; blocks are modified by the caller in place between yields.
        tokens: calibration token ids (num_blocks, block_len), e.g. from ``slmkit.calib_data``.
        batch_size: sequences per forward pass.
        device: where blocks run (default: the model's device). Other blocks stay where they are.
        desc: progress bar label.

    Each yield hands out the same :class:`LayerCalibration`; after the walk its ``hidden_states`` are
    the last block's outputs (a new list per block, so a list kept from an earlier yield stays valid).
    """
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise SlmkitError(f"calibration tokens must be a non-empty (num_blocks, block_len) tensor, got {tuple(tokens.shape)}")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    layers = blocks(model)
    layer = capture_block_inputs(model, tokens, batch_size, device)
    for index in tqdm(range(len(layers)), desc=desc, unit="block"):
        block = layers[index]
        block.to(device)
        layer.at(index, block)
        yield layer
        layer.hidden_states = layer.run()  # the changed block's outputs feed the next block
        if device != home:
            block.to(home)
    if device != home:
        _move_shell(model, layers, home)


def observe_inputs(
    layer: LayerCalibration,
    modules: dict[str, nn.Module],
    reduce: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Run ``layer`` and fold each module's inputs into a statistic with ``reduce(x, state)``.

    ``x`` is the module's input flattened to (tokens, in_features); ``state`` the running value (None at
    first). Returns the final statistic per module name.
    """
    stats: dict[str, torch.Tensor | None] = {name: None for name in modules}

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach()
            stats[name] = reduce(x.reshape(-1, x.shape[-1]), stats[name])

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        layer.run()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def abs_max_reduce(x: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """Running per-channel max of |x| over tokens; x is (tokens, channels)."""
    current = x.abs().amax(dim=0).float()
    return current if state is None else torch.maximum(state, current)


def input_abs_max(layer: LayerCalibration, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Per-input-channel max |activation| of each module over all calibration tokens."""
    return observe_inputs(layer, modules, abs_max_reduce)


def row_sampler(max_rows: int, total_rows: int) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """A reduce for :func:`observe_inputs` keeping about ``max_rows`` evenly strided input rows (tokens)."""
    stride = max(1, total_rows // max_rows)

    def reduce(x: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        rows = x[::stride].float()
        return rows if state is None else torch.cat([state, rows])

    return reduce


def combine(*reducers: Callable) -> Callable[[torch.Tensor, tuple | None], tuple]:
    """One reduce computing several statistics in the same block run; the state is a tuple of theirs."""

    def reduce(x: torch.Tensor, state: tuple | None) -> tuple:
        states = state if state is not None else (None,) * len(reducers)
        return tuple(r(x, s) for r, s in zip(reducers, states))

    return reduce


def cap_length(tokens: torch.Tensor, max_len: int) -> torch.Tensor:
    """Split calibration sequences longer than ``max_len`` into ``max_len`` pieces (the rest is dropped).

    Activations held per block scale with sequence length; capping it bounds calibration memory
    (e.g. 128 × 2048 tokens instead of 128 × 8192 at full context) while keeping every token seen.
    """
    if tokens.shape[1] <= max_len:
        return tokens
    usable = tokens.shape[1] // max_len * max_len
    return tokens[:, :usable].reshape(-1, max_len)


def sq_sum_reduce(x: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
    """Running per-channel Σ x² over tokens (Wanda's ‖X_j‖² and activation importance)."""
    current = x.float().pow(2).sum(dim=0)
    return current if state is None else state + current


def gram_reduce(x: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, int]:
    """Running (Xᵀ X, token count) in float32: the Hessian SparseGPT and GPTQ need, up to scale."""
    x = x.float()
    gram = x.t() @ x
    return (gram, x.shape[0]) if state is None else (state[0] + gram, state[1] + x.shape[0])
