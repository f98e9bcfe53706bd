"""Triton kernels of eigenfast, one op per module.

Modules import Triton on import; set ``TRITON_INTERPRET=1`` before importing one to
run its kernels on the CPU (tests do this in a child process).
"""
