"""Layer-by-layer calibration: capture the inputs of block 0, then walk the blocks one at a time.

Calibration-based transforms (SmoothQuant, GPTQ, AWQ, Wanda, SparseGPT, activation importance, block
influence, shared-FFN capture) share this walk::

    for layer in calib.layerwise(model, tokens):
        stats = calib.input_abs_max(layer, dict(arch.block_linears(model, layer.block)))
        ...change layer.block in place...
    # after the loop body, the walk runs the *changed* block to produce block i+1's inputs

Only one block (plus the captured activations) is on the calibration device at a time, so a model that
does not fit on the device can still be calibrated on it: peak device memory ≈ one block + activations.
Each block gets the masks and position embeddings the model's own forward passes it (they differ per
block where layers alternate attention types), captured once up front.

A walk given a :class:`WalkCheckpoint` saves every finished block to its directory, and now and then
the hidden states between two blocks; after a crash or Ctrl-C, the same call restores the finished
blocks, takes the saved hidden states (running only the finished blocks after them, a forward pass each,
no statistics) and goes on from the next block, ending with the weights an uninterrupted walk gives.
Walks that only measure (importance scores) use :func:`block_stats`, which saves each block's statistics
instead of the block (:class:`StatsCheckpoint`). A loop body that ran the block in its final form hands
its outputs to the walk (``observe_inputs(..., keep_outputs=True)``), so such walks run each block once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from slmkit._files import save_tensors_atomic, write_text_atomic
from slmkit._processes import is_main_process, wait_for_everyone
from slmkit.errors import SlmkitError, first_line
from slmkit.models.arch import blocks, check_context, get_spec
from slmkit.models.record import get_record


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
    # Set by a loop body that ran the block in its final form (``observe_inputs(..., keep_outputs=True)``):
    # the walk feeds these to the next block instead of running this one again. None at every yield.
    outputs: list[torch.Tensor] | None = dataclasses.field(default=None, repr=False)

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


def _read_tensors(file: Path, what: str, remedy: str,
                  parse: Callable[[dict[str, str]], Any] = dict) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors, ``parse(metadata)``) of a safetensors file this module wrote; a missing, truncated or
    foreign file is one SlmkitError naming it, ``what`` it should hold and the ``remedy``."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            parsed = parse(handle.metadata() or {})
            return {name: handle.get_tensor(name) for name in handle.keys()}, parsed
    except Exception as error:
        raise SlmkitError(f"{file}: cannot read {what} ({first_line(error, 200)}); {remedy}") from None


class WalkCheckpoint:
    """A directory where :func:`layerwise` saves each finished block, so an interrupted walk resumes.

    Holds ``block-<i>.safetensors`` per finished block (its tensors, and the layouts of the modules the
    transform put in it) and ``state.json`` (how many blocks are finished, the model's metrics then, and
    the fingerprint). The fingerprint names the work: the transform's config, the calibration tokens and
    the model's history. A directory holding another walk's blocks is refused, never mixed in.

    ``frontier.safetensors`` holds the walk's hidden states after a recent finished block (the next
    block's inputs), so a resumed walk runs only the finished blocks after it instead of all of them. It is
    written after the first block and then whenever ten times its last write time has passed since then:
    saving costs at most about a tenth of the walk's time.

    Resume with the model as it was before the interrupted call (loaded again, or the recipe's last step
    checkpoint): the saved blocks replace blocks 0..k-1, the walk redoes block k onwards.

    In a multi-process run (``accelerate launch``, ``torchrun``) every process walks the same blocks to the
    same result: only the main process (``writer``) writes, every process reads what it wrote on resume.

    Example (what ``slmkit.quantize(model, config, calib=calib, checkpoint_dir="out/gptq.blocks")`` does):
        >>> checkpoint = WalkCheckpoint.for_step("out/gptq.blocks", model, config, calib)
        >>> for layer in layerwise(model, calib, checkpoint=checkpoint):
        ...     ...  # change layer.block; once the loop body is done, the block is saved
    """

    STATE = "state.json"
    FRONTIER = "frontier.safetensors"

    def __init__(self, directory: str | os.PathLike, fingerprint: str, writer: bool | None = None):
        self.directory = Path(directory).expanduser()
        self.fingerprint = fingerprint
        self.writer = is_main_process() if writer is None else writer  # whether this process writes files
        self._frontier_saved_at: float | None = None  # perf_counter() after the last frontier write
        self._frontier_write_s = 0.0

    @classmethod
    def for_step(cls, directory: str | os.PathLike, model: nn.Module, config: Any,
                 calib: torch.Tensor) -> "WalkCheckpoint":
        """The checkpoint of applying ``config`` to ``model`` with calibration tokens ``calib``."""
        record = get_record(model)
        digest = hashlib.sha256()
        tokens = calib.detach().cpu().contiguous()
        digest.update(json.dumps({"config": config.to_dict(), "name": config.name, "source": record.source,
                                  "steps": record.steps, "blocks": len(blocks(model)),
                                  "tokens": [list(tokens.shape), str(tokens.dtype)]},
                                 sort_keys=True, default=str).encode())
        digest.update(tokens.numpy().tobytes())
        return cls(directory, digest.hexdigest())

    def _block_file(self, index: int) -> Path:
        return self.directory / f"block-{index:04d}.safetensors"

    def completed(self) -> int:
        """How many blocks an earlier run of this walk finished (0: none, or no directory yet)."""
        state_file = self.directory / self.STATE
        if not state_file.is_file():
            return 0
        try:
            state = json.loads(state_file.read_text())
            done, fingerprint = int(state["completed"]), state["fingerprint"]
        except (ValueError, KeyError, TypeError) as error:
            raise SlmkitError(f"{state_file}: corrupt walk state ({error}); delete {self.directory}") from None
        self.check_fingerprint(fingerprint)
        return done

    def check_fingerprint(self, fingerprint: str) -> None:
        """Refuse files written by another walk (a different config, model or calibration data)."""
        if fingerprint != self.fingerprint:
            raise SlmkitError(f"{self.directory} holds the blocks of another calibration walk (a different "
                              f"config, model or calibration data); delete it or choose another directory")

    def save_block(self, model: nn.Module, index: int, block: nn.Module) -> None:
        """Save finished block ``index`` (tensors + module layouts), then record it as finished."""
        from slmkit.models.checkpoint import json_default

        if not self.writer:
            return
        record = get_record(model)
        prefix = f"{get_spec(model).layers}.{index}."
        modules = {path: layout for path, layout in record.modules.items() if path.startswith(prefix)}
        tensors = {name: t.detach().cpu().clone() for name, t in block.state_dict().items()}  # no shared storage
        save_tensors_atomic(self._block_file(index), tensors, {"modules": json.dumps(modules, default=json_default)})
        self._save_state(model, index)

    def _save_state(self, model: nn.Module, index: int) -> None:
        """Record blocks 0..index as finished, with the model's metrics now."""
        from slmkit.models.checkpoint import json_default

        state = {"fingerprint": self.fingerprint, "completed": index + 1, "metrics": get_record(model).metrics}
        write_text_atomic(self.directory / self.STATE, json.dumps(state, default=json_default) + "\n")

    def _frontier_due(self) -> bool:
        """Whether to write the frontier now: first after the first block, then every 10 write times."""
        if self._frontier_saved_at is None:
            return True
        return time.perf_counter() - self._frontier_saved_at >= 10 * self._frontier_write_s

    def save_frontier(self, next_index: int, hidden_states: list[torch.Tensor]) -> None:
        """Keep ``hidden_states`` (block ``next_index``'s inputs, one tensor per batch) when it is due."""
        if not self.writer or not self._frontier_due():
            return
        start = time.perf_counter()
        tensors = {f"batch-{i:05d}": h.detach().cpu().contiguous() for i, h in enumerate(hidden_states)}
        save_tensors_atomic(self.directory / self.FRONTIER, tensors,
                            {"fingerprint": self.fingerprint, "next": str(next_index)})
        self._frontier_saved_at = time.perf_counter()
        self._frontier_write_s = self._frontier_saved_at - start

    def load_frontier(self, done: int, like: list[torch.Tensor]) -> tuple[int, list[torch.Tensor]]:
        """(block index, its input hidden states) saved at or before finished block ``done``; (0, like)
        when none is saved. ``like``: the walk's block-0 inputs, whose shapes and dtypes it must match."""
        file = self.directory / self.FRONTIER
        if not file.is_file():
            return 0, like
        tensors, (fingerprint, next_index) = _read_tensors(
            file, "the saved hidden states", "delete it to resume from the saved blocks alone",
            lambda metadata: (metadata.get("fingerprint"), int(metadata["next"])))
        hidden = [tensors[name] for name in sorted(tensors)]  # batch-00000, batch-00001, ...
        self.check_fingerprint(fingerprint)
        if (next_index > done or len(hidden) != len(like)
                or any(h.shape != x.shape or h.dtype != x.dtype for h, x in zip(hidden, like))):
            raise SlmkitError(f"{file}: the saved hidden states do not fit this walk; delete it to resume from "
                              f"the saved blocks alone")
        return next_index, [h.to(x.device) for h, x in zip(hidden, like)]

    def stats(self, name: str) -> "StatsCheckpoint":
        """A :class:`StatsCheckpoint` for a measuring walk of this work, in the subdirectory ``name``."""
        return StatsCheckpoint(self.directory / name, self.fingerprint, self.writer)

    def load_block(self, model: nn.Module, index: int, block: nn.Module) -> None:
        """Put saved block ``index`` into ``block`` (in place): its replaced modules, then its tensors."""
        from slmkit.models.checkpoint import rebuild_modules

        file = self._block_file(index)
        tensors, modules = _read_tensors(file, "a saved block", f"delete {self.directory} to start the walk over",
                                         lambda metadata: json.loads(metadata["modules"]))
        prefix = f"{get_spec(model).layers}.{index}."
        dtype = next((t.dtype for t in block.parameters() if t.is_floating_point()), torch.float32)
        rebuild_modules(block, {path[len(prefix):]: layout for path, layout in modules.items()}, dtype, file)
        try:
            block.load_state_dict(tensors, strict=True)
        except RuntimeError as error:
            raise SlmkitError(f"{file}: does not fit block {index} ({first_line(error, 200)})") from None
        get_record(model).modules.update(modules)

    def restore_metrics(self, model: nn.Module) -> None:
        """Merge the metrics saved with the last finished block into the model's record, in place."""
        state = json.loads((self.directory / self.STATE).read_text())
        _merge_into(get_record(model).metrics, state.get("metrics", {}))


class StatsCheckpoint(WalkCheckpoint):
    """A :class:`WalkCheckpoint` for walks that leave the blocks as they are and only measure them.

    Each finished block's statistics (a dict of tensors) go to ``stats-<i>.safetensors``; the blocks
    themselves are not saved: they are unchanged (a resumed walk runs those after the saved hidden states
    to rebuild the next block's inputs).
    Made by :meth:`WalkCheckpoint.stats`; used by :func:`block_stats`.
    """

    def _stats_file(self, index: int) -> Path:
        return self.directory / f"stats-{index:04d}.safetensors"

    def save_block(self, model: nn.Module, index: int, block: nn.Module) -> None:
        """Record block ``index`` as finished (its statistics are saved already, by :meth:`save_stats`)."""
        if not self.writer:
            return
        if not self._stats_file(index).is_file():
            raise SlmkitError(f"{self._stats_file(index)}: block {index}'s statistics were not saved")
        self._save_state(model, index)

    def load_block(self, model: nn.Module, index: int, block: nn.Module) -> None:
        """Nothing to restore: a measuring walk leaves the block unchanged."""

    def save_stats(self, index: int, stats: dict[str, torch.Tensor]) -> None:
        """Save block ``index``'s statistics (before the walk records the block as finished)."""
        if not self.writer:
            return
        tensors = {name: t.detach().cpu().contiguous().clone() for name, t in stats.items()}
        save_tensors_atomic(self._stats_file(index), tensors, {"fingerprint": self.fingerprint})

    def load_stats(self, index: int) -> dict[str, torch.Tensor]:
        """Block ``index``'s saved statistics."""
        file = self._stats_file(index)
        stats, fingerprint = _read_tensors(file, "saved statistics", f"delete {self.directory} to start the walk over",
                                           lambda metadata: metadata.get("fingerprint"))
        self.check_fingerprint(fingerprint)
        return stats


def _merge_into(target: dict, saved: dict) -> None:
    """Update ``target`` from ``saved`` keeping the identity of nested dicts and lists a transform may hold."""
    for key, value in saved.items():
        current = target.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            _merge_into(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            current[:] = value
        else:
            target[key] = value


def _kept(checkpoint: WalkCheckpoint | None, file_name: str, compute: Callable[[], Any],
          load: Callable[[Path], tuple[str, Any]], store: Callable[[Path, Any], None]) -> Any:
    """``compute()``, or what an earlier run of the same work kept in ``checkpoint``'s ``file_name``.

    ``load(file)`` → (fingerprint, value); ``store(file, value)`` writes it (atomically)."""
    if checkpoint is None:
        return compute()
    checkpoint.completed()  # refuses a directory of another walk before any work
    file = checkpoint.directory / file_name
    if file.is_file():
        fingerprint, value = load(file)
        checkpoint.check_fingerprint(fingerprint)
        return value
    value = compute()
    if checkpoint.writer:
        store(file, value)
    return value


def cached(checkpoint: WalkCheckpoint | None, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept as JSON in the walk's directory so a resumed run does not compute it again.

    For costly passes a transform makes before its walk (e.g. SmoothQuant's sensitivity measurement).
    """
    from slmkit.models.checkpoint import json_default

    def load(file: Path) -> tuple[str, Any]:
        try:
            saved = json.loads(file.read_text())
            return saved["fingerprint"], saved["value"]
        except (ValueError, KeyError, TypeError) as error:
            raise SlmkitError(f"{file}: corrupt ({error}); delete it to compute it again") from None

    def store(file: Path, value: Any) -> None:
        write_text_atomic(file, json.dumps({"fingerprint": checkpoint.fingerprint, "value": value},
                                           default=json_default) + "\n")

    return _kept(checkpoint, f"{name}.json", compute, load, store)


def cached_tensors(checkpoint: WalkCheckpoint | None, name: str,
                   compute: Callable[[], tuple[dict[str, torch.Tensor], dict]]) -> tuple[dict[str, torch.Tensor], dict]:
    """``compute()`` → (tensors, JSON-able info), kept in one safetensors file of the walk's directory.

    For costly pieces of work a transform does after its walk (e.g. the shared-FFN merge of each group):
    a resumed run loads the finished pieces and computes only the rest.
    """
    from slmkit.models.checkpoint import json_default

    def load(file: Path) -> tuple[str, tuple[dict[str, torch.Tensor], dict]]:
        tensors, (fingerprint, info) = _read_tensors(
            file, "a kept result", "delete it to compute it again",
            lambda metadata: (metadata["fingerprint"], json.loads(metadata["info"])))
        return fingerprint, (tensors, info)

    def store(file: Path, value: tuple[dict[str, torch.Tensor], dict]) -> None:
        tensors, info = value
        save_tensors_atomic(file, {key: t.detach().cpu().contiguous().clone() for key, t in tensors.items()},
                            {"fingerprint": checkpoint.fingerprint, "info": json.dumps(info, default=json_default)})

    return _kept(checkpoint, f"{name}.safetensors", compute, load, store)


def layerwise(
    model: nn.Module,
    tokens: torch.Tensor,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    desc: str = "calibrating",
    checkpoint: WalkCheckpoint | None = None,
) -> Iterator[LayerCalibration]:
    """Yield each block with its calibration inputs; after each yield, propagate through the block.

    Args:
        model: the model; blocks are modified by the caller in place between yields.
        tokens: calibration token ids (num_blocks, block_len), e.g. from ``slmkit.calib_data``.
        batch_size: sequences per forward pass.
        device: where blocks run (default: the model's device). Other blocks stay where they are.
        desc: progress bar label.
        checkpoint: save each finished block there; blocks an earlier run finished are restored, not
            yielded again (see :class:`WalkCheckpoint`).

    Each yield hands out the same :class:`LayerCalibration`; after the walk its ``hidden_states`` are
    the last block's outputs (a new list per block, so a list kept from an earlier yield stays valid).
    A loop body that ran the block in its final form may hand its outputs over in ``layer.outputs``
    (see :func:`observe_inputs`): the walk then does not run the block again.
    """
    if tokens.ndim != 2 or tokens.numel() == 0:
        raise SlmkitError(f"calibration tokens must be a non-empty (num_blocks, block_len) tensor, got {tuple(tokens.shape)}")
    check_context(model, tokens.shape[1], "a calibration block")
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    layers = blocks(model)
    done = checkpoint.completed() if checkpoint is not None else 0
    if done > len(layers):
        raise SlmkitError(f"{checkpoint.directory} holds {done} blocks; this model has {len(layers)}")
    layer = capture_block_inputs(model, tokens, batch_size, device)
    if done:
        # blocks before the saved frontier are only loaded; the ones after it run to rebuild the inputs
        start, layer.hidden_states = checkpoint.load_frontier(done, layer.hidden_states)
        print(f"slmkit: {desc}: resuming after block {done} of {len(layers)} from {checkpoint.directory}"
              + (f" (hidden states saved after block {start})" if start else ""))
        for index in tqdm(range(done), desc=f"{desc}: restoring", unit="block"):
            block = layers[index]
            checkpoint.load_block(model, index, block)
            if index < start:
                continue
            block.to(device)
            layer.at(index, block)
            layer.hidden_states = layer.run()
            if device != home:
                block.to(home)
        checkpoint.restore_metrics(model)
    if checkpoint is not None:
        wait_for_everyone()  # the main process writes again only once every process has read what it needs
    for index in tqdm(range(done, len(layers)), desc=desc, unit="block", initial=done, total=len(layers)):
        block = layers[index]
        block.to(device)
        layer.at(index, block)
        yield layer
        if checkpoint is not None:
            checkpoint.save_block(model, index, block)
        # the changed block's outputs feed the next block
        outputs, layer.outputs = layer.outputs, None
        layer.hidden_states = outputs if outputs is not None else layer.run()
        if checkpoint is not None:
            checkpoint.save_frontier(index + 1, layer.hidden_states)
        if device != home:
            block.to(home)
    if device != home:
        _move_shell(model, layers, home)


def block_stats(
    model: nn.Module,
    tokens: torch.Tensor,
    measure: Callable[[LayerCalibration], dict[str, torch.Tensor]],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    desc: str = "measuring",
    checkpoint: StatsCheckpoint | None = None,
) -> list[dict[str, torch.Tensor]]:
    """``measure(layer)`` for every block of a walk that leaves the blocks unchanged; one dict per block.

    ``measure`` returns the block's statistics (tensors) and may hand the block's outputs to the walk in
    ``layer.outputs`` (then each block runs once). With ``checkpoint``, each block's statistics are saved
    as it finishes, and a resumed call loads the finished blocks' statistics and measures only the rest.

    Example (Minitron-style FFN channel energy per block):
        >>> stats = block_stats(model, calib, lambda layer: observe_inputs(
        ...     layer, {"down": layer.block.mlp.down_proj}, sq_sum_reduce, keep_outputs=True))
    """
    done = checkpoint.completed() if checkpoint is not None else 0
    results = [checkpoint.load_stats(index) for index in range(done)] if done else []
    for layer in layerwise(model, tokens, batch_size, device, desc=desc, checkpoint=checkpoint):
        stats = measure(layer)
        if checkpoint is not None:
            checkpoint.save_stats(layer.index, stats)
        results.append(stats)
    return results


def observe_inputs(
    layer: LayerCalibration,
    modules: dict[str, nn.Module],
    reduce: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    keep_outputs: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``layer`` and fold each module's inputs into a statistic with ``reduce(x, state)``.

    ``x`` is the module's input flattened to (tokens, in_features); ``state`` the running value (None at
    first). Returns the final statistic per module name. ``keep_outputs``: the loop body will not change
    the block after this, so the walk takes this run's outputs (``layer.outputs``) instead of running the
    block again.
    """
    stats: dict[str, torch.Tensor | None] = {name: None for name in modules}

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach()
            stats[name] = reduce(x.reshape(-1, x.shape[-1]), stats[name])

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        outputs = layer.run()
    finally:
        for handle in handles:
            handle.remove()
    if keep_outputs:
        layer.outputs = outputs
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


def shrink_gram(gram: torch.Tensor, amount: float) -> torch.Tensor:
    """``(1 - amount) · G + amount · diag(G)``: a Gram matrix XᵀX pulled toward its diagonal (a new tensor).

    A shrinkage estimate, as Ledoit and Wolf's for covariances: each input's energy (the diagonal) stays,
    the correlations between inputs, which calibration text of one domain over-fits, are damped.
    ``amount`` 0 returns ``gram`` itself, 1 keeps only the diagonal.
    """
    if amount == 0:
        return gram
    shrunk = gram * (1.0 - amount)
    shrunk.diagonal().add_(gram.diagonal() * amount)
    return shrunk
