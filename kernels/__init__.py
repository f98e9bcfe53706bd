"""Triton kernels of eigenfast, one op per module.

This folder installs as ``eigenfast.kernels`` (pyproject.toml maps it), so import
``eigenfast.kernels.attribution_pass1``, never a top-level ``kernels``: that name
belongs to other packages (Hugging Face's kernels).

Modules import Triton on import; set ``TRITON_INTERPRET=1`` before importing one to
run its kernels on the CPU (tests do this in a child process).
"""
