"""Export quantized models in the compressed-tensors format (the ``quantization_config`` vLLM reads).

- W4A16 / W8A16 (:class:`WeightOnlyLinear`) → format ``pack-quantized``: ``weight_packed`` int32 (codes
  + 2**(bits-1), 32/bits a word), ``weight_scale`` (out, G), ``weight_shape`` and, when asymmetric,
  ``weight_zero_point`` packed along the output dimension; strategy ``group`` or ``channel``.
- W8A8 (:class:`W8A8Linear`) → format ``int-quantized``: ``weight`` int8, ``weight_scale`` (out, 1)
  float32, int8 activations per token (dynamic) or per tensor (static, ``input_scale``).

compressed-tensors requires the group size to divide a layer's width; slmkit allows a partial last group
(SmolLM2's 576 columns at group 128). Such a layer is written with group size ``gcd(group, width)`` (64
there), each scale repeated for the smaller groups it covers: the same numbers, so the export is exact.
Layers are assigned to config groups by exact module name. The codes are packed with slmkit's own code;
``tests/quantize/test_export.py`` checks the result with the ``compressed-tensors`` package and by
loading it with transformers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from slmkit._files import default_modes, ensure_new
from slmkit.errors import SlmkitError, first_line
from slmkit.models.arch import set_module
from slmkit.models.record import ModelRecord, attach_record, get_record, require_model
from slmkit.quantize.linear import W8A8Linear, WeightOnlyLinear


# --- pure tensor functions -----------------------------------------------------------------------


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (rows, cols) → int32 (rows, ceil(cols·bits/32)), compressed-tensors' dense packing:
    element i of a row occupies bits [i·bits, (i+1)·bits) of the row's bit string, stored as q + 2**(bits-1)."""
    if 32 % bits:
        raise ValueError(f"pack_int32 supports 4 and 8 bits, got {bits}")
    per_word = 32 // bits
    rows, cols = codes.shape
    unsigned = (codes.to(torch.int64) + (1 << (bits - 1))).clamp(0, (1 << bits) - 1)
    words = -(-cols // per_word)
    unsigned = torch.nn.functional.pad(unsigned, (0, words * per_word - cols)).view(rows, words, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    packed = (unsigned << shifts).sum(dim=2)  # < 2**32
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def export_group_size(group_size: int | None, in_features: int) -> int | None:
    """The group size written for a layer: ``gcd(group_size, in_features)`` (None stays per channel)."""
    return None if group_size is None else math.gcd(group_size, in_features)


def regroup(params: torch.Tensor, group_size: int | None, in_features: int) -> torch.Tensor:
    """(out, G) parameters → (out, in / g') for the export group size g' (each repeated g / g' times)."""
    target = export_group_size(group_size, in_features)
    if target is None or target == group_size:
        return params
    return params.repeat_interleave(group_size // target, dim=1)[:, : in_features // target]


def weight_only_tensors(module: WeightOnlyLinear) -> dict[str, torch.Tensor]:
    """compressed-tensors ``pack-quantized`` tensors of one weight-only linear (local names)."""
    codes = module.codes().cpu()
    scale = regroup(module.weight_scale.cpu(), module.group_size, module.in_features)
    tensors = {"weight_packed": pack_int32(codes, module.bits), "weight_scale": scale.contiguous(),
               "weight_shape": torch.tensor([module.out_features, module.in_features], dtype=torch.int64)}
    if module.weight_zero_point is not None:
        zero = regroup(module.weight_zero_point.cpu(), module.group_size, module.in_features)
        tensors["weight_zero_point"] = pack_int32(zero.t().contiguous(), module.bits).t().contiguous()
    return tensors


def w8a8_tensors(module: W8A8Linear) -> dict[str, torch.Tensor]:
    """compressed-tensors ``int-quantized`` tensors of one W8A8 linear (local names)."""
    tensors = {"weight": module.weight.cpu().contiguous(), "weight_scale": module.weight_scale.cpu().float()[:, None]}
    if module.input_scale is not None:
        tensors["input_scale"] = module.input_scale.cpu().float().reshape(1)
    return tensors


def scheme_of(module: nn.Module) -> tuple[str, dict]:
    """(format, scheme dict) compressed-tensors uses for ``module``."""
    if isinstance(module, WeightOnlyLinear):
        group = export_group_size(module.group_size, module.in_features)
        weights = {"num_bits": module.bits, "type": "int", "symmetric": module.symmetric, "dynamic": False,
                   "strategy": "channel" if group is None else "group", "group_size": group}
        return "pack-quantized", {"weights": weights, "input_activations": None, "output_activations": None}
    weights = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": False, "strategy": "channel",
               "group_size": None}
    static = module.act_quant == "static"
    inputs = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": not static,
              "strategy": "tensor" if static else "token", "group_size": None}
    return "int-quantized", {"weights": weights, "input_activations": inputs, "output_activations": None}


# --- model walking -------------------------------------------------------------------------------


def quantization_config(model: nn.Module) -> tuple[dict, dict[str, nn.Module]]:
    """The ``quantization_config`` of ``model`` and its quantized modules by name."""
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, (WeightOnlyLinear, W8A8Linear))}
    if not quantized:
        raise SlmkitError("export: the model has no quantized linears; quantize it first (e.g. GPTQConfig)")
    groups: dict[str, dict] = {}
    formats = set()
    for name, module in quantized.items():
        fmt, scheme = scheme_of(module)
        formats.add(fmt)
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {"targets": [], **scheme})["targets"].append(name)
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": group for i, group in enumerate(groups.values())},
        "ignore": [name for name in linears if name not in quantized],
    }
    if config["format"] == "mixed-precision":
        for group in config["config_groups"].values():
            group["format"] = scheme_of(quantized[group["targets"][0]])[0]
    return config, quantized


def export(model: nn.Module, path: str | os.PathLike, format: str = "compressed-tensors",
           overwrite: bool = False) -> Path:
    """Write a quantized ``model`` in a serving format; today ``"compressed-tensors"`` (vLLM), see
    :func:`export_compressed_tensors`. Refuses an existing ``path`` unless ``overwrite``."""
    require_model(model, "slmkit.export")
    if format != "compressed-tensors":
        raise SlmkitError(f"export: unknown format {format!r}; available: 'compressed-tensors'")
    return export_compressed_tensors(model, path, overwrite)


def export_compressed_tensors(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` (W8A8, W8A16 or W4A16 from slmkit) as a compressed-tensors checkpoint for vLLM.

    The directory holds ``config.json`` with the ``quantization_config``, ``model.safetensors`` and the
    tokenizer; it is written to a temporary directory and renamed into place.

    Example:
        >>> slmkit.quantize(model, GPTQConfig(scheme="W4A16", group_size=128))
        >>> slmkit.export(model, "out/smollm2-w4a16-ct")     # then: vllm serve out/smollm2-w4a16-ct
    """
    if type(model).__name__ == "SlmForCausalLM":
        raise SlmkitError("export: per-layer widths and shared FFNs (SlmForCausalLM) are not an architecture "
                          "vLLM knows; export models that keep a transformers architecture")
    config, quantized = quantization_config(model)
    target = ensure_new(path, overwrite)
    tensors: dict[str, torch.Tensor] = {}
    inside = set()
    for name, module in quantized.items():
        local = weight_only_tensors(module) if isinstance(module, WeightOnlyLinear) else w8a8_tensors(module)
        if module.bias is not None:
            local["bias"] = module.bias.detach().cpu()
        tensors.update({f"{name}.{key}": value for key, value in local.items()})
        inside.update(f"{name}.{key}" for key, _ in module.named_buffers())
    seen = {}
    for name, tensor in model.state_dict().items():
        if name in inside:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen and getattr(model.config, "tie_word_embeddings", False):
            continue  # tied lm_head: transformers re-ties it on load
        seen[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model_config = model.config.to_dict()
        model_config["quantization_config"] = config
        (temporary / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
        save_file(tensors, str(temporary / "model.safetensors"), metadata={"format": "pt"})
        record = get_record(model)
        manifest = {"source": record.source, "steps": record.steps, "modules": record.modules,
                    "metrics": record.metrics}
        (temporary / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        tokenizer = record.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)
        default_modes(temporary)
        if target.exists():
            shutil.rmtree(target)
        temporary.rename(target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return target


# --- reading compressed-tensors checkpoints ------------------------------------------------------

EXPORT_MANIFEST = "slmkit_export.json"  # slmkit's own layouts and history, beside an export


def unpack_int32(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 (rows, words) → signed int8 codes (rows, columns)."""
    per_word = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    unsigned = (words[:, :, None] >> shifts) & ((1 << bits) - 1)  # (rows, words, per_word)
    return (unsigned.reshape(packed.shape[0], -1)[:, :columns] - (1 << (bits - 1))).to(torch.int8)


def describe_quantization(config: dict) -> str:
    """A ``quantization_config`` in words: method, format and each scheme group (e.g. ``compressed-tensors
    (pack-quantized): W4A16 group 64 asymmetric, 210 linears; not quantized: lm_head``), for ``slmkit info``."""
    text = f"{config.get('quant_method')} ({config.get('format', 'format not named')})"
    schemes = []
    for group in (config.get("config_groups") or {}).values():
        weights, inputs = group.get("weights") or {}, group.get("input_activations") or {}
        scheme = f"W{weights.get('num_bits', '?')}A{inputs.get('num_bits', 16)}"
        if weights.get("strategy") == "group":
            scheme += f" group {weights.get('group_size')}"
        elif weights.get("strategy"):
            scheme += f" per {weights['strategy']}"
        scheme += " symmetric" if weights.get("symmetric", True) else " asymmetric"
        if inputs:
            scheme += f", activations per {inputs.get('strategy')}{' dynamic' if inputs.get('dynamic') else ''}"
        targets = group.get("targets") or []
        schemes.append(f"{scheme}, {len(targets)} linear{'s' if len(targets) != 1 else ''}")
    if schemes:
        text += ": " + "; ".join(schemes)
    if config.get("ignore"):
        text += f"; not quantized: {', '.join(config['ignore'][:3])}{' ...' if len(config['ignore']) > 3 else ''}"
    return text


def is_compressed_tensors(path: Path) -> bool:
    """Whether ``path`` holds a compressed-tensors checkpoint (config.json's quantization_config says so)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def _targets(group: dict, linears: dict[str, nn.Module], ignore: list[str]) -> list[str]:
    """Module names a config group covers: exact names, ``re:`` patterns, or the class name ``Linear``."""
    import re

    names = []
    for target in group.get("targets", []):
        if target in linears:
            names.append(target)
        elif target.startswith("re:"):
            names += [n for n in linears if re.match(target[3:], n)]
        elif target == "Linear":
            names += list(linears)
    ignored = lambda n: n in ignore or any(p.startswith("re:") and re.match(p[3:], n) for p in ignore)  # noqa: E731
    return [n for n in dict.fromkeys(names) if not ignored(n)]


def load_compressed_tensors(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a compressed-tensors checkpoint (W4A16/W8A16 ``pack-quantized``, W8A8 ``int-quantized``) into
    slmkit's quantized modules, keeping the integer codes as they are (no dequantize/requantize).

    slmkit's own exports come back bit-exactly, with their original group sizes and history.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path).expanduser()
    config = AutoConfig.from_pretrained(path)
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    del config.quantization_config
    manifest = json.loads((path / EXPORT_MANIFEST).read_text()) if (path / EXPORT_MANIFEST).is_file() else {}
    layouts = manifest.get("modules", {})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SlmkitError(f"{path}: no .safetensors files")
    state = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (OSError, SafetensorError) as error:
            raise SlmkitError(f"{file}: cannot read it ({first_line(error)}); export the model again") from None
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    modules = {}
    for group in quant.get("config_groups", {}).values():
        fmt = group.get("format") or quant.get("format")
        weights, inputs = group.get("weights") or {}, group.get("input_activations")
        for name in _targets(group, linears, quant.get("ignore", [])):
            bias = state.pop(f"{name}.bias", None)
            if fmt == "pack-quantized":
                bits, written_group = weights["num_bits"], weights.get("group_size")
                if bits not in (4, 8) or weights.get("type", "int") != "int" or inputs:
                    raise SlmkitError(f"{path}: {name}: unsupported scheme {weights} (slmkit reads W4A16 and W8A16)")
                out, columns = (int(v) for v in state.pop(f"{name}.weight_shape"))
                codes = unpack_int32(state.pop(f"{name}.weight_packed"), bits, columns)
                scale = state.pop(f"{name}.weight_scale")
                zero = state.pop(f"{name}.weight_zero_point", None)
                if zero is not None:
                    zero = unpack_int32(zero.t().contiguous(), bits, out).t().contiguous()
                group_size = layouts.get(name, {}).get("group_size", written_group)
                if group_size != written_group:  # undo the export's repetition for a partial last group
                    step = group_size // written_group
                    scale = scale[:, ::step]
                    zero = zero[:, ::step] if zero is not None else None
                module = WeightOnlyLinear.from_codes(codes, scale, zero, bits, group_size, bias)
            elif fmt == "int-quantized":
                if weights.get("num_bits") != 8 or not inputs or inputs.get("num_bits") != 8:
                    raise SlmkitError(f"{path}: {name}: unsupported scheme (slmkit reads int8 W8A8)")
                weight = state.pop(f"{name}.weight")
                act_quant = "dynamic" if inputs.get("dynamic") else "static"
                module = W8A8Linear(weight.shape[1], weight.shape[0], bias is not None, act_quant, dtype=dtype)
                module.weight = weight
                module.weight_scale = state.pop(f"{name}.weight_scale").float().reshape(-1)
                if act_quant == "static":
                    module.input_scale = state.pop(f"{name}.input_scale").float().reshape(())
                if bias is not None:
                    module.bias = bias
            else:
                raise SlmkitError(f"{path}: format {fmt!r} is not supported (slmkit reads pack-quantized and "
                                  "int-quantized)")
            set_module(model, name, module)
            modules[name] = module.layout()
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise SlmkitError(f"{path}: unexpected tensor {result.unexpected_keys[0]!r} for this config")
    model.tie_weights()
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        from slmkit.models.loading import exact_decoding

        tokenizer = exact_decoding(AutoTokenizer.from_pretrained(path))
    attach_record(model, ModelRecord(source=manifest.get("source", str(path)), tokenizer=tokenizer,
                                     steps=list(manifest.get("steps", [])), modules=modules,
                                     metrics=dict(manifest.get("metrics", {}))))
    return model.eval()
