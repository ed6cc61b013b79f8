import copy
import types

import pytest
import torch

import slmkit
from slmkit.errors import SlmkitError
from slmkit.models.loading import _gguf_cache_dir, align_special_tokens, resolve_source
from tests.conftest import random_tokens, tiny_model


def test_local_hf_directory(tmp_path):
    model = tiny_model("mistral")
    model.save_pretrained(tmp_path / "hf")
    loaded = slmkit.load_model(tmp_path / "hf")
    tokens = random_tokens(1, 8)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert loaded.slmkit.source == str(tmp_path / "hf")
    assert not loaded.training


def test_dtype_and_bad_dtype(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "hf")
    assert next(slmkit.load_model(tmp_path / "hf", dtype="bfloat16").parameters()).dtype == torch.bfloat16
    with pytest.raises(SlmkitError, match="unknown dtype 'float8'"):
        slmkit.load_model(tmp_path / "hf", dtype="float8")


def test_source_classification(tmp_path):
    assert resolve_source("smollm2-135m") == ("embedded", "smollm2-135m")
    assert resolve_source("HuggingFaceTB/SmolLM2-135M") == ("hub", "HuggingFaceTB/SmolLM2-135M")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert resolve_source(tmp_path / "model.gguf")[0] == "gguf"
    assert resolve_source(tmp_path)[0] == "gguf"  # a folder with one .gguf file


@pytest.mark.parametrize("source, message", [
    ("./does/not/exist", "no such file or directory"),
    ("missing.gguf", "no such file or directory"),
])
def test_missing_paths(source, message):
    with pytest.raises(SlmkitError, match=message):
        slmkit.load_model(source)


def test_directory_without_model(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SlmkitError, match="no config.json"):
        slmkit.load_model(tmp_path)


def test_hub_id_offline_and_not_cached(tmp_path):
    import os
    import subprocess
    import sys

    # huggingface_hub reads HF_HUB_OFFLINE at import time, so run a fresh interpreter, as a user would.
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    result = subprocess.run([sys.executable, "-m", "slmkit.cli", "eval", "someone/not-cached-model"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("slmkit: error: could not load 'someone/not-cached-model' from the Hugging Face hub")
    assert "HF_HUB_OFFLINE is set" in last


def test_unsupported_architecture(tmp_path):
    import transformers

    config = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                    num_attention_heads=2, word_embed_proj_dim=16)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    with pytest.raises(SlmkitError, match="architecture 'opt' is not supported"):
        slmkit.load_model(tmp_path / "opt")
    config.save_pretrained(tmp_path / "opt-config-only")  # refused from config.json, before any weights are read
    with pytest.raises(SlmkitError, match="architecture 'opt' is not supported"):
        slmkit.load_model(tmp_path / "opt-config-only")


def test_embedded_default_loads_with_tokenizer(smollm2_path):
    model = slmkit.load_model("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.slmkit.tokenizer is not None and model.slmkit.tokenizer.chat_template
    assert "quantization_config" not in model.config.to_dict()  # a plain float model, saveable
    tokenizer = model.slmkit.tokenizer  # the GGUF file's special tokens (eos ends generation, separates documents)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)
    assert model.config.eos_token_id == 2
    assert tokenizer.clean_up_tokenization_spaces is False  # exact BPE decoding, without transformers' warning
    assert tokenizer.decode(tokenizer("Hello , world !")["input_ids"]) == "Hello , world !"


def test_exact_decoding_leaves_wordpiece_cleanup_alone(smollm2_tokenizer):
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from transformers import PreTrainedTokenizerFast

    from slmkit.models.loading import exact_decoding

    bpe = copy.deepcopy(smollm2_tokenizer)
    bpe.clean_up_tokenization_spaces = True  # as SmolLM2's GGUF conversion writes it
    assert exact_decoding(bpe) is bpe and bpe.clean_up_tokenization_spaces is False
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),
                                        clean_up_tokenization_spaces=True)
    assert exact_decoding(wordpiece).clean_up_tokenization_spaces is True


def test_special_tokens_follow_the_config(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", None  # what transformers 5.17 converts
    config = types.SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=2, unk_token_id=10**9)
    changed = align_special_tokens(tokenizer, config)
    assert changed == {"eos": ("<|im_start|>", "<|im_end|>"), "pad": (None, "<|im_end|>")}
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.unk_token == smollm2_tokenizer.unk_token  # an id outside the vocabulary is left alone
    assert align_special_tokens(tokenizer, config) == {}


def test_a_gguf_conversion_cached_with_other_special_tokens_is_mended(tmp_path, monkeypatch, smollm2_tokenizer):
    # a conversion cached by an older slmkit under transformers 5.17: the tokenizer files say eos <|im_start|>
    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")  # never read: its conversion is already in the cache
    cached = _gguf_cache_dir(gguf)
    tiny_model("llama", vocab_size=len(smollm2_tokenizer), eos_token_id=2, pad_token_id=2).save_pretrained(cached)
    stale = copy.deepcopy(smollm2_tokenizer)
    stale.eos_token, stale.pad_token = "<|im_start|>", None
    stale.save_pretrained(cached)
    model = slmkit.load_model(gguf)
    assert (model.slmkit.tokenizer.eos_token, model.slmkit.tokenizer.pad_token_id) == ("<|im_end|>", 2)


@pytest.mark.parametrize("cause, expected", [
    ("RepositoryNotFoundError", "the hub has no such model (or it is private"),
    ("GatedRepoError", "it is a gated repository: request access at https://huggingface.co/someone/model"),
    ("LocalEntryNotFoundError", "not in the local cache and the hub could not be reached (offline?); download it "
                                "where the hub is reachable or pass a local path (HF_HUB_OFFLINE=1 skips the hub's "
                                "retries)"),
])
def test_hub_failures_say_why(monkeypatch, cause, expected):
    from huggingface_hub import errors

    from slmkit.models import loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    response = types.SimpleNamespace(headers={}, request=None)
    hub_error = (errors.LocalEntryNotFoundError("no connection") if cause == "LocalEntryNotFoundError"
                 else getattr(errors, cause)("404", response=response))

    def fail(location, dtype):  # what transformers raises: an OSError wrapping the hub's error
        raise OSError("transformers' own words\nmore lines") from hub_error

    monkeypatch.setattr(loading, "_load_hf", fail)
    with pytest.raises(SlmkitError) as raised:
        loading._load_hub("someone/model", torch.float32)
    message = str(raised.value)
    assert message.startswith("could not load 'someone/model' from the Hugging Face hub: " + expected)
    assert message.endswith("(transformers' own words)")


def test_devices_this_machine_lacks_are_refused_in_one_line():
    from slmkit.models.loading import parse_device

    assert parse_device("cpu") == torch.device("cpu") and parse_device(torch.device("cpu")).type == "cpu"
    with pytest.raises(SlmkitError, match=r"^unknown device 'gpu'; use cpu, cuda or cuda:N$"):
        slmkit.load_model("smollm2-135m", device="gpu")  # before loading anything
    with pytest.raises(SlmkitError, match=r"^device 'xpu' is not supported; use cpu, cuda or cuda:N$"):
        parse_device("xpu")
    if not torch.cuda.is_available():
        reason = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        with pytest.raises(SlmkitError, match=rf"^device 'cuda:1': {reason}; use --device cpu$"):
            parse_device("cuda:1")
    else:
        with pytest.raises(SlmkitError, match=r"this machine has \d+ CUDA GPU"):
            parse_device(f"cuda:{torch.cuda.device_count()}")


def test_a_directory_without_readable_weights_is_a_one_line_error(tmp_path):
    from tests.conftest import tiny_config

    tiny_config("llama").save_pretrained(tmp_path / "config-only")
    with pytest.raises(SlmkitError, match=r"config-only: cannot load its weights \(Error no file named model"):
        slmkit.load_model(tmp_path / "config-only")
    tiny_model("llama").save_pretrained(tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SlmkitError, match=r"truncated: cannot load its weights \(Error while deserializing header"):
        slmkit.load_model(tmp_path / "truncated")


def test_an_unreadable_gguf_is_a_one_line_error_and_caches_nothing(tmp_path, monkeypatch, capsys):
    from slmkit.models.loading import embedded_gguf_path

    monkeypatch.setenv("SLMKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file")
    with open(embedded_gguf_path(), "rb") as whole:  # header fine, tensors cut
        (tmp_path / "cut.gguf").write_bytes(whole.read(2_000_000))
    for name in ("junk.gguf", "cut.gguf"):  # the reason in parentheses is the gguf reader's, version-dependent
        with pytest.raises(SlmkitError, match=rf"{name}: cannot read it as a GGUF model \(.+\)$"):
            slmkit.load_model(tmp_path / name)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())
    import transformers

    def stop(*args, **kwargs):
        raise OSError("stopped here")

    (tmp_path / "whole.gguf").symlink_to(embedded_gguf_path())  # readable: its dequantization begins
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", stop)
    with pytest.raises(SlmkitError, match=r"whole.gguf: cannot read it as a GGUF model \(stopped here\)"):
        slmkit.load_model(tmp_path / "whole.gguf")
    captured = capsys.readouterr()
    assert "slmkit: dequantizing" in captured.err and "dequantizing" not in captured.out  # stdout is for output


def test_a_directory_without_a_tokenizer_loads_and_says_so_on_stderr(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "no-tokenizer")
    model = slmkit.load_model(tmp_path / "no-tokenizer")
    assert model.slmkit.tokenizer is None
    captured = capsys.readouterr()
    assert "no-tokenizer (the directory has no tokenizer files); text needs one, token ids work" in captured.err
    assert "no tokenizer" not in captured.out  # stdout stays for output (generated text, JSON)
