"""Small file-safety helpers shared by the API, the CLI and the benchmark scripts."""

from __future__ import annotations

import os
from pathlib import Path

from slmkit.errors import SlmkitError


def ensure_new(path: str | os.PathLike, overwrite: bool) -> Path:
    """Return ``path`` as a Path; refuse (SlmkitError) when it exists and ``overwrite`` is False."""
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise SlmkitError(f"{path} already exists; choose another path or pass --overwrite (overwrite=True)")
    return path


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place (no half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_tensors_atomic(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file through a temporary file renamed into place."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
