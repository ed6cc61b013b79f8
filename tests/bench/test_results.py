"""Result files of the benchmark scripts: adding rows to an earlier result only when it scored the same text."""

import copy

import pytest

import slmkit
from slmkit.bench import check_same_reference
from slmkit.errors import SlmkitError
from slmkit.models.record import get_record
from tests.conftest import tiny_model


@pytest.fixture
def setup(tmp_path, smollm2_tokenizer):
    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    get_record(model).tokenizer = smollm2_tokenizer
    texts = {}
    for name, words in (("a", "one two three four "), ("b", "five six seven eight ")):
        texts[name] = tmp_path / f"{name}.txt"
        texts[name].write_text(words * 200)
    config = lambda name: slmkit.EvalConfig(source=str(texts[name]), split="all", max_tokens=128, seq_len=64)  # noqa: E731
    row = {"key": "v", "text": slmkit.evaluate(copy.deepcopy(model), reference=model, config=config("a")).to_dict()}
    return model, config, row, tmp_path / "result.json"


def test_rows_of_the_same_text_and_reference_are_accepted(setup):
    model, config, row, path = setup
    check_same_reference(path, [row], model, {"text": config("a")}, lambda r: {"text": r["text"]})
    assert "eval" not in get_record(model).metrics  # the check leaves the reference's record alone
    old_format = copy.deepcopy(row)
    del old_format["text"]["data"]["tokens_sha256"]  # results written before fingerprints: perplexity decides
    check_same_reference(path, [old_format], model, {"text": config("a")}, lambda r: {"text": r["text"]})
    check_same_reference(path, [], None, {"text": config("a")}, lambda r: {"text": r["text"]})  # nothing to check


def test_rows_of_other_text_are_refused(setup):
    model, config, row, path = setup
    with pytest.raises(SlmkitError, match=r"row 'v' scored other text tokens than this environment gives"):
        check_same_reference(path, [row], model, {"text": config("b")}, lambda r: {"text": r["text"]})


def test_rows_against_another_reference_perplexity_are_refused(setup):
    model, config, row, path = setup
    old_format = copy.deepcopy(row)
    del old_format["text"]["data"]["tokens_sha256"]
    old_format["text"]["reference_perplexity"] *= 1.01
    with pytest.raises(SlmkitError, match=r"reference perplexity of .* on text, this environment gives"):
        check_same_reference(path, [old_format], model, {"text": config("a")}, lambda r: {"text": r["text"]})


def test_cpu_results_name_the_processor_and_its_vector_unit(tmp_path):
    from slmkit.bench.results import cpu_name, environment, markdown_header

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t: avx2\n")
    assert cpu_name(cpuinfo) == "AMD EPYC 9B14"
    assert cpu_name(tmp_path / "missing") and cpu_name(tmp_path / "missing") != "AMD EPYC 9B14"
    env = environment()
    if env["device"]["type"] == "cpu":
        assert isinstance(env["device"]["capability"], str) and env["device"]["capability"]  # e.g. AVX512
        assert f"cpu ({env['device']['name']}, {env['device']['capability']})" in markdown_header(env, "t")[2]
