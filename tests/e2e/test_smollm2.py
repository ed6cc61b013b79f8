"""End-to-end on the real SmolLM2-135M-Instruct: load, W8A8, evaluate, save, reload, generate."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import slmkit
from slmkit.cli import main
from slmkit.quantize.linear import W8A8Linear

pytestmark = pytest.mark.e2e
EVAL = slmkit.EvalConfig(max_tokens=2048, seq_len=512)


@pytest.fixture(scope="module")
def results(reference, calib):
    """W8A8 with and without smoothing, each evaluated against the float model."""
    out = {}
    for smoothing in (True, False):
        model = copy.deepcopy(reference)
        slmkit.quantize(model, slmkit.SmoothQuantConfig(alpha=0.5, smoothing=smoothing), calib=calib)
        out[smoothing] = (model, slmkit.evaluate(model, reference=reference, config=EVAL))
    return out


def test_w8a8_quality_and_size(results):
    model, report = results[True]
    assert sum(isinstance(m, W8A8Linear) for m in model.modules()) == 30 * 7
    assert report.perplexity / report.reference_perplexity < 1.05
    assert report.kl_mean < 0.05 and report.top1_agreement > 0.85
    assert report.weight_bytes < 0.45 * report.reference_weight_bytes


def test_smoothing_is_closer_to_float_than_plain_w8a8(results):
    smooth, plain = results[True][1], results[False][1]
    assert smooth.perplexity < plain.perplexity
    assert smooth.kl_mean < plain.kl_mean
    assert smooth.top1_agreement > plain.top1_agreement


def test_save_reload_fresh_process_and_generate(results, tmp_path):
    model, _ = results[True]
    path = slmkit.save(model, tmp_path / "smollm2-w8a8")
    tokens = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save({"tokens": tokens, "logits": model(tokens).logits}, tmp_path / "expected.pt")
    expected_text = slmkit.generate(model, "What is the capital of France?", max_new_tokens=12)
    assert expected_text.strip()
    script = textwrap.dedent(f"""
        import torch, slmkit
        model = slmkit.load_model({str(path)!r})
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            assert torch.equal(model(expected["tokens"]).logits, expected["logits"]), "logits differ"
        print(repr(slmkit.generate(model, "What is the capital of France?", max_new_tokens=12)))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == repr(expected_text)


def test_cli_info_and_generate(results, tmp_path, capsys):
    model, _ = results[True]
    path = slmkit.save(model, tmp_path / "ckpt")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "smoothquant" in out and "210 × W8A8Linear" in out and "perplexity" in out
    assert "30 blocks, hidden 576, 9 heads / 3 kv heads × 64, FFN 1536, vocab 49,152, context 8,192" in out
    assert main(["info", "smollm2-135m"]) == 0  # the embedded GGUF, read without its weights
    out = capsys.readouterr().out
    assert "GGUF file" in out and "llama (slmkit family llama)" in out and "30 blocks, hidden 576" in out
    assert main(["generate", str(path), "--prompt", "Say hello.", "--max-new-tokens", "5"]) == 0
    greedy = capsys.readouterr().out.strip()
    assert greedy
    assert main(["generate", str(path), "-p", "Say hello.", "--max-new-tokens", "8", "--temperature", "0.9",
                 "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main(["generate", str(path), "-p", "Say hello.", "--max-new-tokens", "8", "--temperature", "0.9",
                 "--seed", "3"]) == 0
    assert capsys.readouterr().out == first  # same seed, same sample


def test_smoothing_alone_keeps_smollm2_outputs(reference, calib):
    from slmkit import calib as calibration
    from slmkit.models import arch
    from slmkit.quantize.smoothquant import smooth_block

    model = copy.deepcopy(reference)
    config = slmkit.SmoothQuantConfig(alpha=0.5)
    for layer in calibration.layerwise(model, calib[:4], batch_size=4):
        stats = calibration.input_abs_max(layer, dict(arch.block_linears(model, layer.block)))
        smooth_block(model, layer.block, stats, config)
    tokens = calib[4:6, :128]
    with torch.no_grad():
        expected, got = reference(tokens).logits, model(tokens).logits
    assert not torch.equal(model.model.layers[3].input_layernorm.weight, reference.model.layers[3].input_layernorm.weight)
    relative = ((got - expected).norm() / expected.norm()).item()
    assert relative < 1e-4, relative
