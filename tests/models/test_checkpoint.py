import json
import subprocess
import sys
import textwrap

import pytest
import torch

import slmkit
from slmkit.errors import SlmkitError
from slmkit.models.checkpoint import load_checkpoint
from slmkit.quantize.linear import W8A8Linear
from tests.conftest import assert_ordinary_modes, random_tokens, tiny_model


@pytest.fixture
def quantized(tmp_path):
    model = tiny_model("qwen2")  # has q/k/v biases
    slmkit.quantize(model, slmkit.SmoothQuantConfig(activations="static"), calib=random_tokens(4, 16))
    model.slmkit.metrics["note"] = "measured"
    return model


def test_round_trip_in_a_fresh_process_is_bit_identical(quantized, tmp_path):
    path = slmkit.save(quantized, tmp_path / "ckpt")
    tokens = random_tokens(2, 16, seed=5)
    torch.save(tokens, tmp_path / "tokens.pt")
    with torch.no_grad():
        torch.save(quantized(tokens).logits, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import torch, slmkit
        model = slmkit.load_model({str(path)!r})
        tokens = torch.load({str(tmp_path / 'tokens.pt')!r})
        with torch.no_grad():
            logits = model(tokens).logits
        assert torch.equal(logits, torch.load({str(tmp_path / 'expected.pt')!r})), "logits differ"
        print("identical", type(model.model.layers[0].self_attn.q_proj).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "identical W8A8Linear" in result.stdout


def test_manifest_records_how_it_was_made(quantized, tmp_path):
    path = slmkit.save(quantized, tmp_path / "ckpt")
    manifest = json.loads((path / "slmkit.json").read_text())
    assert manifest["format_version"] == 1 and manifest["model_type"] == "qwen2"
    assert manifest["steps"] == [{"smoothquant": slmkit.SmoothQuantConfig(activations="static").to_dict()}]
    assert manifest["modules"]["model.layers.1.mlp.down_proj"]["type"] == "W8A8Linear"
    assert manifest["metrics"]["note"] == "measured"
    loaded = load_checkpoint(path)
    assert loaded.slmkit.steps == manifest["steps"]
    assert isinstance(loaded.model.layers[1].mlp.down_proj, W8A8Linear)
    assert loaded.model.layers[1].mlp.down_proj.weight.dtype == torch.int8


def test_int8_weights_are_stored_as_int8(quantized, tmp_path):
    from safetensors import safe_open

    path = slmkit.save(quantized, tmp_path / "ckpt")
    with safe_open(str(path / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8


def test_a_saved_checkpoint_is_readable_as_any_file_the_user_writes(quantized, tmp_path):
    # tempfile.mkdtemp gives 0700 and safetensors 0.8 writes 0600: other users and containers could not read it
    path = slmkit.save(quantized, tmp_path / "ckpt")
    assert {p.name for p in path.iterdir()} >= {"model.safetensors", "config.json"}
    assert_ordinary_modes(path)


def test_existing_path_is_refused_without_overwrite(quantized, tmp_path):
    path = slmkit.save(quantized, tmp_path / "ckpt")
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(SlmkitError, match="already exists.*overwrite"):
        slmkit.save(quantized, path)
    assert (path / "model.safetensors").read_bytes() == before
    slmkit.save(tiny_model("qwen2", seed=1), path, overwrite=True)
    assert (path / "model.safetensors").read_bytes() != before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt")]  # no temp dirs left


def test_corrupt_and_missing_files_are_named(quantized, tmp_path):
    path = slmkit.save(quantized, tmp_path / "ckpt")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SlmkitError, match=r"model.safetensors: corrupt"):
        slmkit.load_model(path)
    weights.unlink()
    with pytest.raises(SlmkitError, match=r"model.safetensors: missing"):
        slmkit.load_model(path)
    (path / "slmkit.json").write_text("{not json")
    with pytest.raises(SlmkitError, match=r"slmkit.json: corrupt manifest"):
        slmkit.load_model(path)


def test_a_weights_error_with_no_message_is_still_one_line(quantized, tmp_path, monkeypatch):
    # a library error whose message is empty (str(KeyError()) == '') must not become an IndexError
    path = slmkit.save(quantized, tmp_path / "ckpt")

    def fail(*args, **kwargs):
        raise KeyError()

    monkeypatch.setattr("safetensors.torch.load_file", fail)
    with pytest.raises(SlmkitError, match=r"model.safetensors: cannot load \(KeyError\)$"):
        load_checkpoint(path)


def test_newer_format_is_refused(quantized, tmp_path):
    path = slmkit.save(quantized, tmp_path / "ckpt")
    manifest = json.loads((path / "slmkit.json").read_text())
    manifest["format_version"] = 99
    (path / "slmkit.json").write_text(json.dumps(manifest))
    with pytest.raises(SlmkitError, match="newer than this slmkit understands"):
        slmkit.load_model(path)
