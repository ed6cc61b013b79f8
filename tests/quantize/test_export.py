"""compressed-tensors export: checked with the compressed-tensors package itself and by loading it with
transformers, and reloaded by slmkit bit-exactly (partial last groups included)."""

import json

import pytest
import torch

import slmkit
from slmkit.errors import SlmkitError
from slmkit.quantize import GPTQConfig, RTNConfig, SmoothQuantConfig, quantize
from slmkit.quantize.export import pack_int32, unpack_int32
from slmkit.quantize.linear import WeightOnlyLinear
from tests.conftest import assert_ordinary_modes, random_tokens, tiny_model

CALIB = random_tokens(4, 32, seed=1)
TOKENS = random_tokens(2, 16, seed=3)


def _quantized(config):
    model = tiny_model("llama")  # hidden 64, FFN 96: down_proj's 96 columns are 1.5 groups of 64
    quantize(model, config, calib=CALIB)
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_matches_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, 37), generator=torch.Generator().manual_seed(0))
    codes = codes.to(torch.int8)
    ours = pack_int32(codes, bits)
    assert torch.equal(ours, helpers.pack_to_int32(codes, bits))
    assert torch.equal(unpack_int32(ours, bits, 37), codes)


@pytest.mark.parametrize("config", [GPTQConfig(group_size=64), GPTQConfig(group_size=64, symmetric=False),
                                    RTNConfig(scheme="W8A16", group_size=None), SmoothQuantConfig()],
                         ids=["w4-g64", "w4-g64-asym", "w8a16", "w8a8"])
def test_export_decompresses_with_compressed_tensors_and_reloads_bit_exactly(config, tmp_path):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    model = _quantized(config)
    out = slmkit.export(model, tmp_path / "ct")
    assert_ordinary_modes(out)  # a server account must read it
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    assert written["quant_method"] == "compressed-tensors" and written["quantization_status"] == "compressed"
    assert written["ignore"] == ["lm_head"]
    state = load_file(str(out / "model.safetensors"))
    fmt = written["format"]
    for group in written["config_groups"].values():
        scheme = QuantizationScheme.model_validate({k: v for k, v in group.items() if k != "format"})
        compressor = BaseCompressor.load_from_registry(fmt)
        for name in group["targets"]:
            local = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            weight = compressor.decompress(local, scheme)["weight"]
            module = model.get_submodule(name)
            if isinstance(module, WeightOnlyLinear):
                expected = module.dequantized_weight()
            else:
                expected = module.weight.float() * module.weight_scale[:, None]
            # compressed-tensors multiplies in the scale's dtype (float16): our exact product, rounded once
            torch.testing.assert_close(weight, expected.to(weight.dtype), rtol=0, atol=0, msg=name)
    down = model.model.layers[0].mlp.down_proj
    if isinstance(down, WeightOnlyLinear) and down.group_size == 64:  # 96 columns: written as groups of 32
        assert any(g["weights"]["group_size"] == 32 and "model.layers.0.mlp.down_proj" in g["targets"]
                   for g in written["config_groups"].values())
    loaded = slmkit.load_model(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert loaded.slmkit.steps == model.slmkit.steps
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, loaded(TOKENS).logits)


def test_transformers_loads_the_export_to_the_same_function(tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    model = _quantized(GPTQConfig(group_size=64))
    out = slmkit.export(model, tmp_path / "ct")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # decompressed by compressed-tensors
    with torch.no_grad():
        torch.testing.assert_close(hf(TOKENS).logits, model(TOKENS).logits, rtol=1e-5, atol=1e-5)


def test_export_refuses_float_models_existing_paths_and_unknown_formats(tmp_path):
    with pytest.raises(SlmkitError, match="no quantized linears"):
        slmkit.export(tiny_model("llama"), tmp_path / "float")
    model = _quantized(RTNConfig())
    (tmp_path / "taken").mkdir()
    with pytest.raises(SlmkitError, match="already exists"):
        slmkit.export(model, tmp_path / "taken")
    with pytest.raises(SlmkitError, match="unknown format"):
        slmkit.export(model, tmp_path / "x", format="gguf")
    slmkit.export(model, tmp_path / "taken", overwrite=True)
    assert isinstance(slmkit.load_model(tmp_path / "taken").model.layers[1].self_attn.o_proj, WeightOnlyLinear)


def test_cli_export_writes_once_and_refuses_to_overwrite(tmp_path, capsys):
    from slmkit.cli import main

    model = _quantized(RTNConfig(group_size=32))
    slmkit.save(model, tmp_path / "w4")
    assert main(["export", str(tmp_path / "w4"), str(tmp_path / "w4-vllm")]) == 0
    assert "vllm serve" in capsys.readouterr().out
    assert (tmp_path / "w4-vllm" / "config.json").is_file()
    assert main(["export", str(tmp_path / "w4"), str(tmp_path / "w4-vllm")]) == 2
    assert "already exists" in capsys.readouterr().err
    reloaded = slmkit.load_model(tmp_path / "w4-vllm")
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, model(TOKENS).logits)


def test_a_truncated_export_is_a_one_line_error(tmp_path):
    path = slmkit.export(quantize(tiny_model("llama"), RTNConfig(group_size=16)), tmp_path / "vllm")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    with pytest.raises(SlmkitError, match=r"model.safetensors: cannot read it \(.*\); export the model again"):
        slmkit.load_model(path)
