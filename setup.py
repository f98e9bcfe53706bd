"""Build script: the eigenfast package plus its operator library `eigenfast._C`.

Build against the torch already installed (a CPU or CUDA build, whichever you have):

    pip install --no-build-isolation -e .

Without --no-build-isolation pip would build in a fresh environment and download a
torch there (the registry's default, with several GB of CUDA packages) only to compile
against it; that is also why there is no [build-system] requirement on torch.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("eigenfast builds against an installed torch: install torch first, then run "
             "`pip install --no-build-isolation -e .`")

ROOT = Path(__file__).resolve().parent


def openmp_flags() -> list[str]:
    """-fopenmp when the compiler takes it: ATen's parallel_for is an inline OpenMP
    loop when torch itself uses OpenMP, and runs serially if the extension is built
    without it."""
    if not torch.backends.openmp.is_available():
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


def cuda_toolkit_found() -> bool:
    """A CUDA build of torch and an nvcc to compile the kernel with."""
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return any(Path(CUDA_HOME, "bin", name).exists() for name in ("nvcc", "nvcc.exe"))


def extension() -> Extension:
    """eigenfast._C: the CPU kernels always; the CUDA kernel where it can be built."""
    omp = openmp_flags()
    # -g0 overrides the -g in Python's CFLAGS: debug info made the object 40x larger
    # and the compile a third slower, for a library with one small kernel.
    cxx_flags = ["-O3", "-g0", *omp]
    # Paths relative to this file, as setuptools requires. Every csrc file is a
    # dependency: edits trigger a rebuild, and an sdist made on a machine without CUDA
    # still carries the CUDA sources.
    csrc = Path("csrc")
    sources = [str(csrc / "token_bias.cpp")]
    depends = sorted(str(path.relative_to(ROOT)) for path in (ROOT / csrc).iterdir())
    if cuda_toolkit_found():
        return CUDAExtension(
            "eigenfast._C",
            sources=[*sources, str(csrc / "token_bias_cuda.cpp"), str(csrc / "token_bias_cuda.cu")],
            depends=depends,
            define_macros=[("EIGENFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=omp,
        )
    return CppExtension(
        "eigenfast._C",
        sources=sources,
        depends=depends,
        extra_compile_args=cxx_flags,
        extra_link_args=omp,
    )


setup(
    name="eigenfast",
    version="0.1.0",
    description="Interpretability-driven pruning of Hugging Face causal language models",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["eigenfast", "eigenfast.*", "kernels", "kernels.*"]),
    package_data={"eigenfast": ["builtin/**/*.json", "builtin/**/*.safetensors", "builtin/**/*.txt"]},
    install_requires=[
        "torch",
        "transformers>=4.45",
        "safetensors",
        "tokenizers",
        "tqdm",
        "matplotlib",
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["eigenfast=eigenfast.cli:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
