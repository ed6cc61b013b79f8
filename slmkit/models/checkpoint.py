"""Save and load compressed models: safetensors + config.json + tokenizer + an ``slmkit.json`` manifest.

The manifest records the format version, the slmkit version, the source model, every config applied in
order, the layout of every replaced module (so loading rebuilds them before reading tensors, never
guessing from names) and the metrics measured, plus a SHA-256 of each weight file so a corrupt file is
reported by name. Saving writes to a temporary directory beside the target and renames it into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkit._files import default_modes, ensure_new
from slmkit._version import CHECKPOINT_FORMAT_VERSION, __version__
from slmkit.errors import SlmkitError, first_line
from slmkit.models import compression
from slmkit.models.arch import set_module
from slmkit.models.record import ModelRecord, attach_record, get_record, require_model
from slmkit.quantize.linear import W8A8Linear, WeightOnlyLinear

MANIFEST = "slmkit.json"
WEIGHTS = "model.safetensors"
# Module types a manifest may name, with the constructor arguments their layout carries.
MODULE_TYPES: dict[str, type[nn.Module]] = {"W8A8Linear": W8A8Linear, "WeightOnlyLinear": WeightOnlyLinear}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def json_default(value: Any):
    """``json.dumps(default=...)`` for what records hold beyond JSON: tensors (as lists) and dtypes."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def stored_tensors(model: nn.Module, compress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, dict], dict[str, str]]:
    """What the weights file holds: (tensors by name, compressed entries, tied aliases).

    Tied tensors (e.g. lm_head = embeddings) are stored once under their first name; ``aliases`` maps
    the others to it. Sparse tensors for which it is smaller are stored as ``NAME.__values`` +
    ``NAME.__bitmask`` and listed in ``compressed`` (name → shape and format). A model that is otherwise
    dense is stored under transformers' own names, so ``from_pretrained`` reads it unchanged.
    """
    tensors, compressed, aliases, seen = {}, {}, {}, {}
    for name, tensor in model.state_dict().items():
        if type(tensor).__name__.startswith("SparseSemiStructured"):
            raise SlmkitError(f"{name} is a GPU 2:4 sparse tensor; save the model before to_semi_structured()")
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensor = tensor.detach().cpu().contiguous()
        # Only weights are compressed (pruning makes them sparse); other tensors that happen to be mostly
        # zero, such as low-rank corrections that start at zero, keep transformers' names and layout.
        if compress and name.endswith(".weight") and compression.should_compress(tensor):
            values, bitmask = compression.compress(tensor)
            tensors[f"{name}.__values"], tensors[f"{name}.__bitmask"] = values, bitmask
            compressed[name] = {"format": "bitmask", "shape": list(tensor.shape)}
        else:
            tensors[name] = tensor
    return tensors, compressed, aliases


def rebuild_modules(model: nn.Module, modules: dict[str, dict], dtype: torch.dtype, where: Any) -> None:
    """Put an empty module of each recorded layout (path -> layout) into ``model``, ready for its tensors.

    ``where`` names the file the layouts came from, for the error about a module type this slmkit lacks.
    """
    for module_path, layout in modules.items():
        layout = dict(layout)
        kind = layout.pop("type")
        if kind not in MODULE_TYPES:
            raise SlmkitError(f"{where}: unknown module type {kind!r} at {module_path}; upgrade slmkit")
        set_module(model, module_path, MODULE_TYPES[kind](**layout, dtype=dtype))


def restore_tensors(tensors: dict[str, torch.Tensor], compressed: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`stored_tensors`' compression: dense tensors by their state-dict names."""
    state = dict(tensors)
    for name, entry in compressed.items():
        if entry.get("format") != "bitmask":
            raise SlmkitError(f"{name}: unknown storage format {entry.get('format')!r}; upgrade slmkit")
        try:
            values, bitmask = state.pop(f"{name}.__values"), state.pop(f"{name}.__bitmask")
            state[name] = compression.decompress(values, bitmask, entry["shape"])
        except (KeyError, ValueError) as error:
            raise SlmkitError(f"{name}: compressed weight is incomplete or corrupt ({error})") from None
    return state


def build_manifest(model: nn.Module) -> dict[str, Any]:
    """The manifest dict for ``model`` (without file hashes)."""
    record = get_record(model)
    return {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "slmkit_version": __version__,
        "source": record.source,
        "model_type": model.config.model_type,
        "steps": record.steps,
        "modules": record.modules,
        "metrics": record.metrics,
    }


def save(model: nn.Module, path: str | os.PathLike, overwrite: bool = False, compress: bool = True) -> Path:
    """Save ``model`` (compressed or not) as an slmkit checkpoint directory, atomically.

    Args:
        model: a model from ``load_model``, possibly transformed.
        path: the output directory; refused if it exists unless ``overwrite=True``.
        overwrite: replace an existing directory (only after the new one is completely written).
        compress: store sparse tensors as values + bitmask when smaller (pruned models shrink on disk;
            such files need ``slmkit.load_model``). ``False`` keeps every tensor dense under transformers'
            names, so plain ``AutoModelForCausalLM.from_pretrained`` reads a float model.

    Example:
        >>> slmkit.save(model, "out/smollm2-w8a8")
    """
    from safetensors.torch import save_file

    require_model(model, "slmkit.save")
    target = ensure_new(path, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        tensors, compressed, aliases = stored_tensors(model, compress)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.config.to_json_file(tmp / "config.json")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer = get_record(model).tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        manifest = build_manifest(model)
        manifest["compressed"], manifest["aliases"] = compressed, aliases
        manifest["files"] = {WEIGHTS: {"sha256": _sha256(tmp / WEIGHTS), "bytes": (tmp / WEIGHTS).stat().st_size}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=json_default) + "\n")
        default_modes(tmp)  # readable by others as a save_pretrained directory is meant to be
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
            os.replace(target, old / "old")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a checkpoint's manifest; errors name the file and what is wrong."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise SlmkitError(f"{file}: missing; {path} is not an slmkit checkpoint")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SlmkitError(f"{file}: corrupt manifest ({error})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise SlmkitError(f"{file}: corrupt manifest (no format_version)")
    if version > CHECKPOINT_FORMAT_VERSION:
        raise SlmkitError(
            f"{file}: format version {version} is newer than this slmkit understands "
            f"({CHECKPOINT_FORMAT_VERSION}); upgrade slmkit"
        )
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Check every weight file exists and matches the size and hash in the manifest."""
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise SlmkitError(f"{file}: missing from the checkpoint")
        if file.stat().st_size != expected["bytes"] or _sha256(file) != expected["sha256"]:
            raise SlmkitError(f"{file}: corrupt (size or SHA-256 differs from {MANIFEST}); save the model again")


def _check_complete(model: nn.Module, path: Path, result, aliases: dict[str, str] | None) -> None:
    """Every model tensor was loaded, or is tied to one that was; nothing unexpected was in the file."""
    if result.unexpected_keys:
        raise SlmkitError(f"{path / WEIGHTS}: unexpected tensor {result.unexpected_keys[0]!r} for this config")
    state = model.state_dict()
    for name in result.missing_keys:
        target = (aliases or {}).get(name)
        if aliases is None:  # checkpoints written before aliases were recorded: accept config-tied tensors
            target = next((k for k, t in state.items() if k != name and t.data_ptr() == state[name].data_ptr()), None)
        if target is None or state[target].data_ptr() != state[name].data_ptr():
            raise SlmkitError(f"{path / WEIGHTS}: tensor {name!r} is missing")


def load_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load an slmkit checkpoint saved by :func:`save`; compressed modules are rebuilt from the manifest."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path).expanduser()
    manifest = read_manifest(path)
    verify_files(path, manifest)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise SlmkitError(f"{path / 'config.json'}: missing or corrupt ({first_line(error)})") from None
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    rebuild_modules(model, manifest.get("modules", {}), dtype, where=path / MANIFEST)
    try:
        state = restore_tensors(load_file(str(path / WEIGHTS)), manifest.get("compressed", {}))
        result = model.load_state_dict(state, strict=False)
    except SlmkitError as error:
        raise SlmkitError(f"{path / WEIGHTS}: {error}") from None
    except Exception as error:  # safetensors/torch raise several types for truncated or mismatched files
        raise SlmkitError(f"{path / WEIGHTS}: cannot load ({first_line(error, 200)})") from None
    _check_complete(model, path, result, manifest.get("aliases"))
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        from slmkit.models.loading import exact_decoding

        tokenizer = exact_decoding(AutoTokenizer.from_pretrained(path))
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    attach_record(
        model,
        ModelRecord(
            source=manifest.get("source", str(path)),
            tokenizer=tokenizer,
            steps=list(manifest.get("steps", [])),
            modules=dict(manifest.get("modules", {})),
            metrics=dict(manifest.get("metrics", {})),
        ),
    )
    return model.eval()
