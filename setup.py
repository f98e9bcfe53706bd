"""The operator library eigenfast._C: the one part of the build that has to be code.

Everything else (metadata, packages, dependencies) is in pyproject.toml. The library
builds against the torch already installed, a CPU or CUDA build, so install torch
first and then this package without build isolation:

    pip install --no-build-isolation -e .
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")  # setuptools wants source paths relative to this file

# The C++ kernels, the op schemas and the C++ autograd formulas: every build has them.
CPU_SOURCES = ["token_bias.cpp", "token_bias_autograd.cpp"]
# The CUDA glue (PyTorch C++) and the kernel (plain CUDA). No two sources of one build
# may share a file stem: they would compile to the same object file.
CUDA_SOURCES = ["token_bias_cuda_ops.cpp", "token_bias_cuda.cu"]


def extension_sources(with_cuda: bool) -> list[str]:
    """The sources of eigenfast._C, for a CPU-only or a CUDA build."""
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
    return [str(CSRC / name) for name in names]


def openmp_flags(torch_module) -> list[str]:
    """-fopenmp when the compiler takes it: ATen's parallel_for is an inline OpenMP
    loop when torch itself uses OpenMP, and runs serially if the extension is built
    without it."""
    if not torch_module.backends.openmp.is_available():
        return []
    compiler = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.cpp")
        probe.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            result = subprocess.run([compiler, "-fopenmp", str(probe), "-o", str(Path(tmp, "probe"))],
                                    capture_output=True)
        except OSError:
            return []
    return ["-fopenmp"] if result.returncode == 0 else []


def cuda_toolkit_found(torch_module, cuda_home: str | None) -> bool:
    """A CUDA build of torch and an nvcc to compile the kernel with."""
    if torch_module.version.cuda is None or cuda_home is None:
        return False
    return any(Path(cuda_home, "bin", name).exists() for name in ("nvcc", "nvcc.exe"))


def build() -> None:
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        raise SystemExit("eigenfast builds its C++ extension against an installed torch: install torch "
                         "first, then run `pip install --no-build-isolation -e .`") from None

    omp = openmp_flags(torch)
    # -g0 overrides the -g in Python's CFLAGS: debug info made the object 40x larger
    # and the compile a third slower, for a library with one small kernel.
    cxx_flags = ["-O3", "-g0", *omp]
    # Every csrc file is a dependency: edits trigger a rebuild, and an sdist made on a
    # machine without CUDA still carries the CUDA sources.
    depends = sorted(str(path.relative_to(ROOT)) for path in (ROOT / CSRC).iterdir())
    with_cuda = cuda_toolkit_found(torch, CUDA_HOME)
    if with_cuda:
        extension: Extension = CUDAExtension(
            "eigenfast._C",
            sources=extension_sources(with_cuda=True),
            depends=depends,
            define_macros=[("EIGENFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=omp,
        )
    else:
        extension = CppExtension(
            "eigenfast._C",
            sources=extension_sources(with_cuda=False),
            depends=depends,
            extra_compile_args=cxx_flags,
            extra_link_args=omp,
        )
    setup(ext_modules=[extension], cmdclass={"build_ext": BuildExtension})


# Guarded so tests can import this file to read extension_sources() without building.
if __name__ == "__main__":
    build()
