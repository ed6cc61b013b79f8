import copy

import pytest
import torch

import slmkit
from slmkit.config import ConfigError
from slmkit.errors import SlmkitError
from slmkit.models.record import get_record
from tests.conftest import tiny_model


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(f"word{i % 97} and more words" for i in range(600)))
    return str(path)


def test_against_itself_and_a_perturbed_copy(text_file, smollm2_tokenizer):
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    get_record(model).tokenizer = smollm2_tokenizer
    config = slmkit.EvalConfig(source=text_file, split="all", max_tokens=256, seq_len=64, batch_size=2)
    same = slmkit.evaluate(model, reference=copy.deepcopy(model), config=config)
    assert same.tokens == 4 * 63
    assert same.kl_mean < 1e-6 and same.top1_agreement == 1.0
    assert same.perplexity == pytest.approx(same.reference_perplexity)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    report = slmkit.evaluate(changed, reference=model, config=config)
    assert report.kl_mean > 1e-4 and report.kl_p99 >= report.kl_mean
    assert report.top1_agreement < 1.0
    assert report.weight_bytes == report.reference_weight_bytes > 0
    assert "perplexity (reference → model)" in report.table()
    assert get_record(changed).metrics["eval"]["kl_mean"] == report.kl_mean
    assert len(same.data["tokens_sha256"]) == 16 and report.data["tokens_sha256"] == same.data["tokens_sha256"]


def test_fingerprint_tells_different_text_apart(tmp_path, smollm2_tokenizer):
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    fingerprints = []
    for text in ("one two three four " * 200, "one two three five " * 200):
        path = tmp_path / "text.txt"
        path.write_text(text)
        config = slmkit.EvalConfig(source=str(path), split="all", max_tokens=64, seq_len=64)
        fingerprints.append(slmkit.evaluate(model, config=config, tokenizer=smollm2_tokenizer).data["tokens_sha256"])
    assert fingerprints[0] != fingerprints[1]


def test_without_reference(text_file, smollm2_tokenizer):
    model = tiny_model("qwen2", vocab_size=len(smollm2_tokenizer))
    config = slmkit.EvalConfig(source=text_file, split="all", max_tokens=128, seq_len=64)
    report = slmkit.evaluate(model, config=config, tokenizer=smollm2_tokenizer)
    assert report.kl_mean is None and report.perplexity > 1
    assert "perplexity" in report.table()


def test_vocabulary_mismatch_is_refused(text_file, smollm2_tokenizer):
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    other = tiny_model("llama", vocab_size=300)
    config = slmkit.EvalConfig(source=text_file, split="all", max_tokens=128, seq_len=64)
    with pytest.raises(SlmkitError, match="vocabulary"):
        slmkit.evaluate(model, reference=other, config=config, tokenizer=smollm2_tokenizer)


def test_model_without_tokenizer_is_a_clear_error(text_file):
    with pytest.raises(SlmkitError, match="no tokenizer to turn text into tokens: save one beside its weights"):
        slmkit.evaluate(tiny_model("llama"), config=slmkit.EvalConfig(source=text_file, split="all",
                                                                      max_tokens=128, seq_len=64))


def test_a_window_longer_than_the_model_takes_is_refused(text_file, smollm2_tokenizer):
    # GPT-2's learned positions end at n_positions (256 here): a longer window was an IndexError mid-evaluation
    model = tiny_model("gpt2", vocab_size=len(smollm2_tokenizer))
    config = slmkit.EvalConfig(source=text_file, split="all", max_tokens=512, seq_len=512)
    with pytest.raises(SlmkitError, match=r"the evaluation window \(seq_len\) is 512 tokens, above the model's "
                                          r"maximum of 256"):
        slmkit.evaluate(model, config=config, tokenizer=smollm2_tokenizer)
    short = tiny_model("llama", vocab_size=len(smollm2_tokenizer), max_position_embeddings=128)
    with pytest.raises(SlmkitError, match=r"\(seq_len, for the reference\) is 256 tokens, above .* of 128"):
        slmkit.evaluate(tiny_model("llama", vocab_size=len(smollm2_tokenizer)), reference=short,
                        config=slmkit.EvalConfig(source=text_file, split="all", max_tokens=256, seq_len=256),
                        tokenizer=smollm2_tokenizer)


def test_fewer_tokens_than_one_window_is_a_config_error():
    with pytest.raises(ConfigError, match=r"max_tokens \(16384\) must be at least seq_len \(100000\)"):
        slmkit.EvalConfig(seq_len=100_000)
