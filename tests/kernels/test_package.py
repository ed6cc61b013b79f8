"""The top-level ``kernels/`` directory installs as ``slmkit.kernels``; Python started in the checkout's root
must still get the Hugging Face ``kernels`` package (transformers >= 5.25 imports it) under that name."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _hub_kernels_installed() -> bool:
    try:  # find_spec would find the checkout's own directory here
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _hub_kernels_installed(), reason="the Hugging Face kernels package is not installed")
def test_the_checkout_root_does_not_shadow_hugging_faces_kernels():
    done = _python("import sys, kernels, slmkit, slmkit.kernels.rmsnorm, transformers.activations; "
                   "print(kernels.__file__); print(slmkit.kernels.__file__); print(sys.path[0] == '')")
    assert done.returncode == 0, done.stderr
    hub, ours, root_first = done.stdout.split()
    assert root_first == "True"  # the root really was searched first
    assert not Path(hub).resolve().is_relative_to(ROOT / "kernels"), hub
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"


def test_without_hugging_faces_kernels_the_top_level_name_is_an_empty_module():
    """transformers (5.17, say, without the package) finds the name, reads no version and counts it as
    unavailable; nothing under it may pretend to be the Hugging Face package or fail to import."""
    # -S: no site-packages, so no Hugging Face kernels; the root goes on the path by hand
    done = _python(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                   "import kernels; print(kernels.__file__)\n"
                   "print(len([name for name in dir(kernels) if not name.startswith('__')]))", "-S")
    assert done.returncode == 0, done.stderr
    ours, names = done.stdout.split()
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py" and names == "0"
