"""User-facing errors.

Every problem a user can fix (a missing path, an unknown config key, text too short to calibrate on)
raises :class:`SlmkitError` with one sentence saying what went wrong, on which input, and what to do.
The CLI prints it as one line and exits non-zero; library callers can catch it.
"""


class SlmkitError(Exception):
    """An error caused by user input or environment, with a message written for the user."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (its type name when it has none): the part a one-line error quotes.

    ``limit`` cuts the line to that many characters (a library's message can be a whole page on one line).

    >>> first_line(ValueError("bad header\\nat byte 12"))
    'bad header'
    >>> first_line(KeyError())
    'KeyError'
    """
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if limit is None else line[:limit]


def import_required(module: str, purpose: str, install: str):
    """Import ``module``, or raise SlmkitError saying that ``purpose`` needs it and how to get it.

    For the packages only some features use (``gguf``, ``datasets``, ``pyarrow``), which a slim
    environment (a GPU image, a container) may lack: one line instead of a ModuleNotFoundError traceback.

    >>> parquet = import_required("pyarrow.parquet", "reading .parquet files", "pip install pyarrow")
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SlmkitError(f"{purpose} needs the '{module.split('.')[0]}' package: {install}") from None
