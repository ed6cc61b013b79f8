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
