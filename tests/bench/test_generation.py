"""``slmkit bench generate`` on CPU with the real SmolLM2 and tiny shapes: the table, the files, the errors."""

import json

import pytest

from slmkit.bench.generation import Shape, datasheet_bandwidth, decode_bytes_per_step, random_prompts
from slmkit.cli import main
from slmkit.errors import SlmkitError
from tests.conftest import tiny_model


def test_cli_writes_json_and_markdown_and_refuses_to_overwrite(tmp_path, capsys, smollm2_path):
    argv = ["bench", "generate", "smollm2-135m", "--shapes", "8/4", "--batch", "1,2", "--out", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads((tmp_path / "generation-smollm2-135m.json").read_text())
    assert [(r["prompt"], r["output"], r["batch"]) for r in result["rows"]] == [(8, 4, 1), (8, 4, 2)]
    for row in result["rows"]:
        systems = {r["system"]: r for r in row["results"]}
        assert set(systems) == {"slmkit", "hf-eager"}  # on CPU the compiled baseline is left out by default
        for r in systems.values():
            assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["output_tokens_per_s"] > 0
            assert r["itl_p50_ms"] <= r["itl_p90_ms"] <= r["itl_p99_ms"]
        assert row["speedup_vs_hf-eager"] > 0 and row["achieved_gb_s"] > 0
    assert result["device"]["type"] == "cpu" and result["versions"]["torch"]
    assert "| 8/4 | 2 | slmkit |" in (tmp_path / "generation-smollm2-135m.md").read_text()
    capsys.readouterr()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "128x128"], "PROMPT/OUTPUT"),
    (["--batch", "one"], "--batch takes integers"),
    (["--baselines", "vllm"], "unknown baseline"),
    (["--dtype", "int4"], "unknown dtype 'int4'"),
])
def test_bad_options_fail_in_one_line(argv, message, tmp_path, capsys):
    # each is reported first: not the existing result file, not the missing model
    (tmp_path / "generation-does-not-exist.json").write_text("{}")
    assert main(["bench", "generate", "./does-not-exist", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_kernel_benchmark_needs_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", "kernels", "--out", "/nonexistent"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_decode_bytes_count_weights_once_and_the_kv_cache():
    model = tiny_model("llama")  # untied: the embedding table is not read by a decode step
    weights = sum(p.numel() * 4 for p in model.parameters()) - model.get_input_embeddings().weight.numel() * 4
    kv_per_token = 2 * 2 * 2 * 16 * 4  # k+v, 2 layers, 2 kv heads, head dim 16... (64 hidden / 4 heads)
    assert decode_bytes_per_step(model, batch=3, context=10) == weights + 3 * 10 * kv_per_token


def test_helpers():
    assert Shape.parse("512/256") == Shape(512, 256)
    with pytest.raises(SlmkitError):
        Shape.parse("5/1")
    assert datasheet_bandwidth("NVIDIA H100 80GB HBM3") == 3350 and datasheet_bandwidth("NVIDIA H200") == 4800
    assert datasheet_bandwidth("NVIDIA H100 PCIe") == 2000 and datasheet_bandwidth("Tesla T4") is None
    prompts = random_prompts(2, 5, 100)
    assert len(prompts) == 2 and all(len(p) == 5 and min(p) >= 10 for p in prompts)
