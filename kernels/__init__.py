"""Triton kernels, installed as ``slmkit.kernels``: one file per op, each with ``_op_kernel`` (triton.jit),
``op()`` (launcher) and ``op_ref()`` (pure-PyTorch reference). Every op also has a PyTorch path in the
package, so slmkit runs without Triton or a GPU.

Python started in a checkout's root (``python -c``, ``python -m pytest``, an interactive session) has the
root on ``sys.path`` first, where this directory shadows the Hugging Face ``kernels`` package that
transformers imports (5.25 and later always). Imported under that top-level name, this file loads the
installed Hugging Face package in its place. Where none is installed it stays an empty module with no
version, which transformers' availability check counts as no usable ``kernels``.
"""

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _root])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds after this file ran
        _spec.loader.exec_module(_module)
    del _root, _spec, importlib, os, sys
