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


def test_merged_rows_keep_the_run_that_measured_each():
    from slmkit.bench.results import environment, markdown_runs, merge_rows, run_record

    env = environment()
    first = run_record(env)
    env["versions"]["torch"] = "changed"
    assert first["versions"]["torch"] != "changed"  # a copy: the run's later changes do not reach its rows
    second = {**run_record(environment()), "date": "2099-01-01T00:00:00+00:00", "command": "python s.py --only b"}
    second["versions"]["transformers"] = "9.9.9"
    earlier = [{"key": "a", "measured": first}, {"key": "b", "measured": first}, {"key": "c"}]
    rows = merge_rows(earlier, [{"key": "b", "measured": second}])
    assert [row.get("measured") for row in rows] == [first, second, None]
    header = {**first, "versions": {**first["versions"], "bitsandbytes": "0.50.2"}}
    assert markdown_runs(rows[:1], header) == []  # one run: the header names it
    lines = markdown_runs(rows, header)
    assert lines[:2] == ["The rows come from 3 runs, oldest first (with what differs from the environment above):", ""]
    assert lines[2] == "- a run whose environment was not recorded: c."
    assert lines[3] == f"- {first['date']} (no bitsandbytes), `{first['command']}`: a."
    assert lines[4] == "- 2099-01-01T00:00:00+00:00 (transformers 9.9.9, no bitsandbytes), `python s.py --only b`: b."
    other_device = {**second, "device": {"type": "cuda", "name": "NVIDIA H100"}, "versions": header["versions"]}
    assert markdown_runs([rows[0], {"key": "d", "measured": other_device}], header)[3] == (
        "- 2099-01-01T00:00:00+00:00 (cuda (NVIDIA H100)), `python s.py --only b`: d.")
    known_end = {"key": "x", "measured": {"before": "2026-12-05T21:55:17+00:00"}}
    assert markdown_runs([known_end, rows[0]], header)[2] == (
        "- before 2026-12-05T21:55:17+00:00, a run whose environment was not recorded: x.")


def test_update_names_the_setting_an_earlier_result_was_measured_with(tmp_path):
    import json

    from slmkit.bench.results import previous_rows

    path = tmp_path / "result.json"
    def recorded(old):
        return {"--max-tokens": old["max_tokens"], "domains": ", ".join(old.get("domains", ["a"]))}

    assert previous_rows(path, False, {"--max-tokens": 1}, recorded) == []  # no --update: nothing read
    with pytest.raises(SlmkitError, match="does not exist yet; run without --update"):
        previous_rows(path, True, {"--max-tokens": 1}, recorded)
    path.write_text(json.dumps({"max_tokens": 8192, "domains": ["a", "b"], "rows": [{"key": "v"}]}))
    assert previous_rows(path, True, {"--max-tokens": 8192, "domains": "a, b"}, recorded) == [{"key": "v"}]
    with pytest.raises(SlmkitError, match=r"measured with --max-tokens 8192, this run has 16384; pass --max-tokens "
                                          r"8192 or rerun all its rows \(--overwrite\)$"):
        previous_rows(path, True, {"--max-tokens": 16384, "domains": "a, b"}, recorded)
    with pytest.raises(SlmkitError, match=r"measured with domains a, b, this run has a; rerun all its rows"):
        previous_rows(path, True, {"--max-tokens": 8192, "domains": "a"}, recorded)
