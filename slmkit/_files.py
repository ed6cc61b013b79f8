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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_modes(path: Path) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the modes ``open``/``mkdir`` give.

    ``tempfile.mkdtemp`` makes directories 0700, and safetensors 0.8 writes files 0600 whatever the umask
    (its writer goes through a temporary file; safetensors/safetensors#782). A checkpoint that another
    user, a container or a serving account must read needs the ordinary modes (0755 / 0644 under umask 022).
    """
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for child in path.rglob("*"):
            if not child.is_symlink():
                os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
    elif path.is_file():
        os.chmod(path, 0o666 & ~mask)


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
    default_modes(tmp)
    os.replace(tmp, path)
