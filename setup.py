"""The operator library eigenfast._C: the one part of the build that has to be code.

Everything else (metadata, packages, dependencies) is in pyproject.toml. The library
builds against the torch already installed, a CPU or CUDA build, so install torch
first and then this package without build isolation:

    pip install --no-build-isolation -e .

The CUDA kernels are compiled in when torch is a CUDA build and nvcc is found, for the
visible GPUs, TORCH_CUDA_ARCH_LIST, or with no GPU the archs that torch was built for;
EIGENFAST_CPU_ONLY=1 leaves them out. The build prints which it made (`pip -v` shows it).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import warnings
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


CPU_ONLY_ENV = "EIGENFAST_CPU_ONLY"


def cuda_toolkit_found(torch_module, cuda_home: str | None) -> bool:
    """A CUDA build of torch, and an nvcc and the CUDA headers to compile the kernel with."""
    if torch_module.version.cuda is None or cuda_home is None:
        return False
    has_nvcc = any(Path(cuda_home, "bin", name).exists() for name in ("nvcc", "nvcc.exe"))
    return has_nvcc and Path(cuda_home, "include", "cuda_runtime.h").exists()


def toolkit_of_nvcc_on_path() -> str | None:
    """The CUDA toolkit of the nvcc on PATH, as nvcc itself reports it (TOP in a dry run).
    Without CUDA_HOME, torch takes the folder above nvcc's: wrong for a wrapper script
    such as /usr/local/bin/nvcc that runs /usr/local/cuda-13.0/bin/nvcc, where it finds
    no CUDA headers."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        result = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True)
    except OSError:
        return None
    top = re.search(r"^#\$ TOP=(.+)$", result.stdout + result.stderr, re.MULTILINE)
    return str(Path(top[1].strip()).resolve()) if top else None


def nvcc_gpu_codes(cuda_home: str) -> list[str]:
    """The real architectures this nvcc compiles for (`nvcc --list-gpu-code`: sm_75 ...);
    empty when it cannot say (an nvcc older than 11.0)."""
    try:
        result = subprocess.run([str(Path(cuda_home, "bin", "nvcc")), "--list-gpu-code"],
                                capture_output=True, text=True)
    except OSError:
        return []
    return result.stdout.split() if result.returncode == 0 else []


def arch_number(code: str) -> str | None:
    """sm_86 -> 8.6, sm_100 -> 10.0, sm_90a -> 9.0a: TORCH_CUDA_ARCH_LIST's spelling."""
    match = re.fullmatch(r"sm_(\d+)(\d)([a-z]?)", code)
    return f"{match[1]}.{match[2]}{match[3]}" if match else None


def default_cuda_archs(torch_codes: list[str], nvcc_codes: list[str]) -> str:
    """The arch list to build for when no GPU is visible to pick one: the architectures
    the installed torch was built for (so the library runs wherever that torch does),
    less those this nvcc cannot compile for, with PTX of the newest for later GPUs.
    Without either list, 8.0 and 9.0 (A100, H100)."""
    wanted = [code for code in torch_codes if not nvcc_codes or code in nvcc_codes]
    archs = [arch for arch in map(arch_number, wanted) if arch is not None] or ["8.0", "9.0"]
    return ";".join(archs) + "+PTX"


def cuda_arch_list(torch_module, cuda_home: str) -> tuple[str | None, str]:
    """The TORCH_CUDA_ARCH_LIST to set for the build (None: leave it to torch) and the
    archs in words. With no GPU visible and no list set, torch's own choice fails: it
    reads the archs of the visible GPUs, an IndexError when there is none."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return None, f"{os.environ['TORCH_CUDA_ARCH_LIST']} (TORCH_CUDA_ARCH_LIST)"
    if torch_module.cuda.is_available():
        return None, "the visible GPUs"
    archs = default_cuda_archs(torch_module.cuda.get_arch_list(), nvcc_gpu_codes(cuda_home))
    return archs, (f"{archs} (no GPU visible: the archs torch {torch_module.__version__} was built for "
                   "that this nvcc compiles; TORCH_CUDA_ARCH_LIST picks others)")


def cpu_only_reason(torch_module, cuda_home: str | None) -> str | None:
    """Why the extension is built without its CUDA kernels, or None to build them."""
    if os.environ.get(CPU_ONLY_ENV, "0") not in ("", "0"):
        return f"{CPU_ONLY_ENV}=1"
    if torch_module.version.cuda is None:
        return "torch is a CPU build"
    if not cuda_toolkit_found(torch_module, cuda_home):
        return (f"no CUDA toolkit (nvcc and include/cuda_runtime.h) at CUDA_HOME={cuda_home}: set CUDA_HOME "
                "to one to build the CUDA kernels")
    return None


def build() -> None:
    # The build runs before pip installs numpy alongside it; it needs no numpy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    try:
        import torch
    except ImportError:
        raise SystemExit("eigenfast builds its C++ extension against an installed torch: install torch "
                         "first, then run `pip install --no-build-isolation -e .`") from None
    # Before torch.utils.cpp_extension reads CUDA_HOME, on import.
    if torch.version.cuda is not None and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        toolkit = toolkit_of_nvcc_on_path()
        if toolkit is not None:
            os.environ["CUDA_HOME"] = toolkit
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    omp = openmp_flags(torch)
    # -g0 overrides the -g in Python's CFLAGS: debug info made the object 40x larger
    # and the compile a third slower, for a library with one small kernel.
    cxx_flags = ["-O3", "-g0", *omp]
    # Every csrc file is a dependency: edits trigger a rebuild, and an sdist made on a
    # machine without CUDA still carries the CUDA sources.
    depends = sorted(str(path.relative_to(ROOT)) for path in (ROOT / CSRC).iterdir())
    cpu_only = cpu_only_reason(torch, CUDA_HOME)
    if cpu_only is None:
        archs, described = cuda_arch_list(torch, CUDA_HOME)
        if archs is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        print(f"eigenfast: building eigenfast._C with CUDA kernels for {described}; "
              f"{CPU_ONLY_ENV}=1 builds it CPU-only")
        extension: Extension = CUDAExtension(
            "eigenfast._C",
            sources=extension_sources(with_cuda=True),
            depends=depends,
            define_macros=[("EIGENFAST_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=omp,
        )
    else:
        print(f"eigenfast: building eigenfast._C CPU-only ({cpu_only})")
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
