"""Tests for slmkit.errors: the one-line messages every user-facing error quotes."""

import pytest

from slmkit.errors import first_line


def test_first_line_keeps_only_the_first_line():
    assert first_line(ValueError("bad header\nat byte 12\n")) == "bad header"


def test_first_line_of_an_empty_message_is_the_type_name():
    # str(KeyError()) is '' and '  \n' strips to '': neither may raise IndexError inside an error handler
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("  \n")) == "OSError"


@pytest.mark.parametrize("limit, expected", [(None, "x" * 300), (200, "x" * 200), (5, "xxxxx")])
def test_first_line_limit(limit, expected):
    assert first_line(RuntimeError("x" * 300 + "\nmore"), limit) == expected


def test_import_required_names_the_feature_and_the_install():
    from slmkit.errors import SlmkitError, import_required

    assert import_required("json", "reading JSON", "pip install json").dumps([1]) == "[1]"
    with pytest.raises(SlmkitError, match=r"^reading \.xyz files needs the 'no_such_pkg' package: pip install "
                                          r"no-such-pkg$"):
        import_required("no_such_pkg.sub", "reading .xyz files", "pip install no-such-pkg")


def test_a_missing_optional_package_is_one_line(tmp_path, monkeypatch):
    import sys

    from slmkit import data
    from slmkit.errors import SlmkitError

    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as in an environment without pyarrow
    with pytest.raises(SlmkitError, match="reading .parquet files needs the 'pyarrow' package: pip install pyarrow"):
        data.load_texts(str(tmp_path / "t.parquet"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SlmkitError, match=r"a Hugging Face dataset source \(hf:NAME\) needs the 'datasets' package"):
        data.load_texts("hf:wikitext")
