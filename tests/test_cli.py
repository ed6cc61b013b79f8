import json
from pathlib import Path

import pytest

import slmkit
from slmkit.cli import build_parser, main
from slmkit.errors import SlmkitError
from tests.conftest import tiny_model


@pytest.mark.parametrize("command", ["run", "eval", "generate", "info", "bench", "export", "serve"])
def test_every_command_has_help_with_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"slmkit {command}" in out


def test_top_level_help_lists_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in ("run", "eval", "generate", "info", "bench", "serve"):
        assert command in out
    assert build_parser().prog == "slmkit"


def _one_line_error(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    err = err.splitlines()[-1]  # progress bars may come before the error line
    assert err.startswith("slmkit: error: ")
    assert expected in err
    return err


def test_missing_model_path(capsys):
    _one_line_error(capsys, ["eval", "./no/such/model"], "no such file or directory")


def test_missing_recipe(capsys, tmp_path):
    _one_line_error(capsys, ["run", str(tmp_path / "nope.yaml")], "no such recipe file")


def test_unknown_recipe_key(capsys, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("steps:\n  - smoothquant: {alpah: 0.5}\n")
    _one_line_error(capsys, ["run", str(recipe)], "unknown key 'alpah'; allowed keys: alpha")


def test_a_bad_override_fails_before_any_work(capsys, tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("steps:\n  - smoothquant: {}\n")
    _one_line_error(capsys, ["run", str(recipe), "--set", "smoothquant.alpha=0.5", "--set", "gptq.damp=0.1"],
                    "'gptq' is neither a recipe key")
    _one_line_error(capsys, ["run", str(recipe), "--set", "smoothquant.alpha=5"], "alpha must be in [0.0, 1.0]")


def test_invalid_yaml(capsys, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("steps: [\n")
    _one_line_error(capsys, ["run", str(recipe)], "invalid YAML")


def test_existing_output_directory_is_not_overwritten(capsys, tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("steps:\n  - smoothquant: {}\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _one_line_error(capsys, ["run", str(recipe), "--output", str(out)], "already exists")
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("text, message", [("\n", "is empty"), ("To be, or not to be.", "text too short")])
def test_bad_calibration_text(capsys, tmp_path, smollm2_path, text, message):
    calibration = tmp_path / "calibration.txt"
    calibration.write_text(text)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {smollm2_path}\ncalibration: {{source: {calibration}}}\nevaluation: null\n"
                      "steps:\n  - smoothquant: {}\n")
    _one_line_error(capsys, ["run", str(recipe), "--output", str(tmp_path / "o")], message)
    assert not (tmp_path / "o").exists()


def test_info_on_a_directory_that_holds_no_model(capsys, tmp_path):
    _one_line_error(capsys, ["info", str(tmp_path)], "directory has no config.json, slmkit.json or single .gguf file")


def test_info_describes_any_model_directory_without_loading_it(capsys, tmp_path):
    import transformers

    tiny_model("gemma3").save_pretrained(tmp_path / "gemma3")  # a plain transformers directory
    assert main(["info", str(tmp_path / "gemma3")]) == 0
    out = capsys.readouterr().out
    assert "transformers directory (not written by slmkit)" in out
    assert "gemma3_text (slmkit family gemma3)" in out
    assert "2 blocks, hidden 64, 4 heads / 2 kv heads × 16, FFN 96, vocab 256, context 256" in out
    assert "1 × sliding window 8, 1 × full" in out and "width pruning   heads, ffn" in out
    slmkit.save(tiny_model("smollm3"), tmp_path / "smollm3")  # an slmkit checkpoint
    assert main(["info", str(tmp_path / "smollm3")]) == 0
    out = capsys.readouterr().out
    assert "slmkit checkpoint v1" in out and "1 × full, 1 × full (no rotary)" in out and "width pruning   ffn" in out
    quantized = slmkit.quantize(tiny_model("qwen3"), slmkit.RTNConfig(group_size=32, symmetric=False))
    slmkit.export(quantized, tmp_path / "vllm")  # compressed-tensors
    assert main(["info", str(tmp_path / "vllm")]) == 0
    out = capsys.readouterr().out
    assert "compressed-tensors (pack-quantized): W4A16 group 32 asymmetric, 14 linears; not quantized: lm_head" in out
    assert "width pruning   none: its weights are quantized" in out  # width pruning refuses quantized linears
    slmkit.save(quantized, tmp_path / "w4")
    assert main(["info", str(tmp_path / "w4")]) == 0
    assert "width pruning   none: its weights are quantized" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "gemma3"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "hf_dir"
    config = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, word_embed_proj_dim=16)
    config.save_pretrained(tmp_path / "opt")
    assert main(["info", str(tmp_path / "opt")]) == 0
    assert "architecture    opt: architecture 'opt' is not supported; supported: " in capsys.readouterr().out


def test_debug_shows_traceback(capsys):
    assert main(["--debug", "eval", "./no/such/model"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_bad_eval_option(capsys):
    _one_line_error(capsys, ["eval", "smollm2-135m", "--seq-len", "0"], "seq_len must be")


@pytest.mark.parametrize("option, message", [
    (["--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
    (["--top-k", "-1"], "top_k must be >= 0"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be at least 1, got 0"),
])
def test_generate_refuses_bad_sampling_before_loading(capsys, option, message):
    # the model does not exist: the sampling settings are checked first
    _one_line_error(capsys, ["generate", "./does-not-exist", "--prompt", "hi", *option], message)


def test_generate_function_checks_sampling_as_the_engine_does(smollm2_path):
    import slmkit
    from slmkit.errors import SlmkitError

    model = slmkit.load_model(smollm2_path)
    with pytest.raises(SlmkitError, match=r"top_p must be in \(0, 1\], got 1.5"):
        slmkit.generate(model, "hi", temperature=0.7, top_p=1.5)
    # without the chat template an empty prompt is no tokens at all: HF generate failed deep in attention
    with pytest.raises(SlmkitError, match="the prompt is empty: give at least one token"):
        slmkit.generate(model, "", chat=False)
    assert isinstance(slmkit.generate(model, "", max_new_tokens=2), str)  # the template's own tokens suffice


def test_serve_refuses_a_bad_or_taken_port_before_loading(capsys):
    import socket

    _one_line_error(capsys, ["serve", "does-not-exist", "--port", "70000"], "--port must be in 0..65535")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        # the model does not exist either: the port is checked first
        _one_line_error(capsys, ["serve", "does-not-exist", "--port", str(port)], f"cannot listen on 127.0.0.1:{port}")


@pytest.mark.parametrize("error, status, last", [
    (KeyboardInterrupt(), 130, "slmkit: interrupted"),
    (MemoryError(), 1, "slmkit: error: the machine ran out of memory (MemoryError)"),
    (SlmkitError("a step failed"), 2, "slmkit: error: a step failed"),
])
def test_an_interrupted_run_says_where_its_work_is_kept_and_how_to_resume(error, status, last, capsys, tmp_path,
                                                                          monkeypatch):
    import slmkit.cli
    import slmkit.recipes

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: smollm2-135m\nsteps:\n  - rtn: {}\n")

    def interrupted(recipe, output, **kwargs):
        slmkit.recipes.partial_dir(Path(output)).mkdir()
        raise error

    monkeypatch.setattr(slmkit.recipes, "run_recipe", interrupted)
    monkeypatch.setattr(slmkit.cli, "_sigterm_interrupts", lambda: None)
    assert main(["run", str(recipe), "--output", str(tmp_path / "out")]) == status
    err = capsys.readouterr().err
    assert f"the finished work is kept in {tmp_path / 'out.partial'}; run the same command again to resume" in err
    assert err.strip().splitlines()[-1].startswith(last)


def test_sigterm_stops_a_command_as_ctrl_c_does():
    import os
    import signal
    import time

    from slmkit.cli import _sigterm_interrupts

    previous = signal.getsignal(signal.SIGTERM)
    try:
        _sigterm_interrupts()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_finished_command_closes_the_process_group_of_a_launched_run(tmp_path, monkeypatch):
    """Under ``accelerate launch`` / ``torchrun`` the command closes the process group itself, rather than leave
    it to the interpreter's teardown."""
    import torch.distributed as dist

    import slmkit.cli

    monkeypatch.setattr(slmkit.cli, "cmd_info", lambda args: 0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["info", str(tmp_path)]) == 0
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("error, message", [
    (OSError(28, "No space left on device"), "slmkit: error: [Errno 28] No space left on device (--debug shows where)"),
    (MemoryError(), "slmkit: error: the machine ran out of memory (MemoryError); use smaller batches"),
    ("cuda-oom", "slmkit: error: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)"),
])
def test_errors_of_the_machine_are_one_line_with_exit_status_1(error, message, capsys, monkeypatch):
    import torch

    if error == "cuda-oom":
        error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB)\nGPU 0 has 79 GiB in use")

    def fail(source):
        raise error

    monkeypatch.setattr("slmkit.models.loading.load_config", fail)
    assert main(["info", "smollm2-135m"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.startswith(message) and len(err.splitlines()) == 1
    assert main(["--debug", "info", "smollm2-135m"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_still_shows_its_traceback(monkeypatch):
    def fail(source):
        raise ValueError("a bug, not the machine")

    monkeypatch.setattr("slmkit.models.loading.load_config", fail)
    with pytest.raises(ValueError, match="a bug"):
        main(["info", "smollm2-135m"])


def test_python_dash_m_slmkit_runs_the_command():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "slmkit", "info", "./does-not-exist"], capture_output=True,
                            text=True)
    assert result.returncode == 2 and result.stderr.strip().startswith("slmkit: error: ./does-not-exist")
