"""Triton kernels, installed as ``slmkit.kernels``: one file per op, each with ``_op_kernel`` (triton.jit),
``op()`` (launcher) and ``op_ref()`` (pure-PyTorch reference). Every op also has a PyTorch path in the
package, so slmkit runs without Triton or a GPU.
"""
