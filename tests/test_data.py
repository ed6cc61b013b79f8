import json
import warnings

import pytest
import torch

from slmkit import data
from slmkit.config import ConfigError
from slmkit.errors import SlmkitError


def test_pack_blocks_random_is_seeded_and_non_overlapping():
    stream = torch.arange(1000)
    a = data.pack_blocks(stream, 10, 5, "random", seed=1)
    b = data.pack_blocks(stream, 10, 5, "random", seed=1)
    c = data.pack_blocks(stream, 10, 5, "random", seed=2)
    assert a.shape == (5, 10) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 0] % 10 == 0).all()  # aligned, non-overlapping blocks
    assert len(set(a[:, 0].tolist())) == 5


def test_pack_blocks_spread_covers_the_stream():
    blocks = data.pack_blocks(torch.arange(100), 10, 4, "spread")
    assert blocks[:, 0].tolist() == [0, 30, 60, 90]


def test_too_short_text_is_a_clear_error():
    with pytest.raises(SlmkitError, match=r"text too short: 15 tokens, need at least 40"):
        data.pack_blocks(torch.arange(15), 10, 4, "random")


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\r\nsecond line\n")
    assert data.load_texts(str(tmp_path / "a.txt")) == ["hello world\nsecond line"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert data.load_texts(str(tmp_path / "b.jsonl")) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(SlmkitError, match=r"bad.jsonl:1: expected a JSON object with a 'text' field"):
        data.load_texts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(SlmkitError, match="is empty"):
        data.load_texts(str(tmp_path / "empty.txt"))
    with pytest.raises(SlmkitError, match="no such text file"):
        data.load_texts(str(tmp_path / "missing.txt"))
    with pytest.raises(SlmkitError, match="unsupported text file type"):
        (tmp_path / "c.csv").write_text("x")
        data.load_texts(str(tmp_path / "c.csv"))


def test_a_directory_source_reads_its_text_files_in_path_order(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b" / ".cache").mkdir(parents=True)
    (corpus / "b" / "2.txt").write_text("second")
    (corpus / "a.jsonl").write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "again"}) + "\n")
    (corpus / "b" / "3.txt").write_text("third")
    (corpus / "notes.md").write_text("not a text source type")  # other types are skipped
    (corpus / "b" / ".cache" / "x.txt").write_text("hidden")  # so are hidden directories
    assert data.load_texts(str(corpus)) == ["first", "again", "second", "third"]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(SlmkitError, match=r"nothing: a directory with no .txt, .jsonl, .parquet files"):
        data.load_texts(str(tmp_path / "nothing"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "x.txt").write_text(" \n")
    with pytest.raises(SlmkitError, match="is empty"):
        data.load_texts(str(tmp_path / "blank"))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["alpha", "", "beta"]}), tmp_path / "d.parquet")
    assert data.load_texts(str(tmp_path / "d.parquet")) == ["alpha", "beta"]


def test_hf_dataset_spec_errors():
    with pytest.raises(SlmkitError, match="expected hf:NAME"):
        data.load_texts("hf:")


def test_data_config_validation():
    with pytest.raises(ConfigError, match="split must be one of"):
        data.DataConfig(split="train")
    with pytest.raises(ConfigError, match="num_blocks must be"):
        data.DataConfig(num_blocks=0)


def test_embedded_split_is_by_work_and_never_overlaps():
    calib_files = {p.name for p in data.embedded_files("calib")}
    eval_files = {p.name for p in data.embedded_files("eval")}
    assert eval_files == {"hamlet_gut.txt", "paradise_regained_gut.txt"}
    assert not calib_files & {"hamlet_gut.txt", "hamlet_gut_f.txt", "paradise_regained_gut.txt", "paradiseregained.txt"}
    assert len(calib_files) > 50
    calib_text = "\n".join(data.load_texts("embedded", "calib"))
    eval_lines = {line.strip() for text in data.load_texts("embedded", "eval") for line in text.splitlines()}
    long_lines = [line for line in eval_lines if len(line) >= 50]
    assert len(long_lines) > 500
    shared = [line for line in long_lines if line in calib_text]
    assert shared == [], shared[:3]


def test_hf_datasets_path_on_a_local_dataset(tmp_path):
    """The hf: source goes through datasets.load_dataset; here on a dataset directory we write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "my_dataset"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["first document", "", "second document"]}), folder / "train.parquet")
    assert data.load_texts(f"hf:{folder}") == ["first document", "second document"]
    with pytest.raises(SlmkitError, match="could not load dataset") as refused:
        data.load_texts(f"hf:{folder}::validation")
    assert "offline" not in str(refused.value)  # a missing split is not a connection problem


def test_hf_dataset_unreachable_says_offline(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):  # what datasets raises when the hub cannot be reached
        raise ConnectionError("Couldn't reach 'someone/corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(SlmkitError, match=r"^could not load dataset 'hf:someone/corpus' \(Couldn't reach .*\); the hub "
                                          r"could not be reached \(offline\?\): .* local \.txt/\.jsonl/\.parquet file"):
        data.load_texts("hf:someone/corpus")


def test_python_docs_is_modern_prose_split_by_topic():
    from slmkit.data import load_texts

    calib, held_out, everything = (load_texts("python-docs", split) for split in ("calib", "eval", "all"))
    assert len(calib) + len(held_out) == len(everything) and len(held_out) >= 15
    assert not set(calib) & set(held_out)
    assert sum(len(t) for t in held_out) > 60_000  # enough for 16k evaluation tokens
    assert "the" in held_out[0] and "function" in " ".join(held_out)


def test_generated_calibration_is_the_models_own_text_and_reproducible():
    from slmkit.data import calib_data
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    with warnings.catch_warnings():  # the cache argument is the installed transformers' own name for it
        warnings.simplefilter("error", FutureWarning)
        first = calib_data(model, n=3, seq_len=12, source="generated", seed=5)
    again = calib_data(model, n=3, seq_len=12, source="generated", seed=5)
    assert first.shape == (3, 12) and first.dtype == torch.long
    assert torch.equal(first, again)
    assert not torch.equal(first, calib_data(model, n=3, seq_len=12, source="generated", seed=6))
    with torch.no_grad():  # tokens 1..4 after the random first token are the model's greedy choices
        logits = model(first[:, :5]).logits
    assert torch.equal(logits[:, :4].argmax(-1), first[:, 1:5])
    with pytest.raises(SlmkitError, match="calibration only"):
        from slmkit.data import load_texts

        load_texts("generated")


def test_calibration_mix_splits_the_blocks_between_its_sources(smollm2_tokenizer):
    from slmkit.data import DataConfig, calib_data, calibration_blocks, load_texts, source_parts, token_blocks
    from slmkit.models.record import get_record
    from tests.conftest import tiny_model

    model = tiny_model("llama", vocab_size=len(smollm2_tokenizer))
    get_record(model).tokenizer = smollm2_tokenizer
    mixed = calib_data(model, n=5, seq_len=16, source="python-docs+generated", seed=2)
    assert mixed.shape == (5, 16)
    docs = token_blocks(smollm2_tokenizer, DataConfig(source="python-docs", num_blocks=3, block_len=16, seed=2))
    assert torch.equal(mixed[:3], docs)  # the first part gets the odd block
    assert torch.equal(mixed[3:], calib_data(model, n=2, seq_len=16, source="generated", seed=2))
    config = DataConfig(source="generated+python-docs", num_blocks=1, block_len=16)
    assert torch.equal(calibration_blocks(model, config), calib_data(model, n=1, seq_len=16, source="generated"))
    assert source_parts("embedded") == ["embedded"] and source_parts("a + b") == ["a", "b"]
    with pytest.raises(SlmkitError, match="empty part"):
        calib_data(model, n=2, seq_len=16, source="embedded+")
    with pytest.raises(SlmkitError, match="no such text file"):
        calib_data(model, n=2, seq_len=16, source="embedded+missing.txt")
    with pytest.raises(SlmkitError, match="calibration only"):
        load_texts("embedded+generated")


def test_a_file_with_a_plus_in_its_name_is_one_source(tmp_path):
    from slmkit.data import source_parts

    path = tmp_path / "c++.txt"
    path.write_text("int main() {}")
    assert source_parts(str(path)) == [str(path)]
