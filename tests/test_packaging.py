"""Packaging: the extension's sources and build choices, the package list, the name
`kernels`, and real installs.

The slow test builds a fresh virtual environment for each Python 3.11-3.13 found on the
machine, installs the pinned set (constraints.txt) and this repository (a regular
install, not editable) and imports the result from outside the repository.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
PYTHONS = ("3.11", "3.12", "3.13")  # the classifiers in pyproject.toml

# Run in a child, so only what that interpreter finds from its working directory counts.
# eigenfast.kernels is a namespace package (kernels/ has no __init__.py): its folder is
# its one __path__ entry. A top-level `kernels` must never be that folder as a regular
# package; with Hugging Face's kernels installed it must be theirs.
IMPORT_CHECK = """
import importlib.util
from pathlib import Path
import eigenfast, eigenfast.kernels, eigenfast.ops
assert eigenfast.ops.extension_available(), "eigenfast._C did not load"
import eigenfast._C
(ours,) = (Path(entry).resolve() for entry in eigenfast.kernels.__path__)
assert (ours / "attribution_pass1.py").is_file(), ours
top = importlib.util.find_spec("kernels")
assert top is None or top.origin is None or Path(top.origin).resolve().parent != ours, top
print(eigenfast.__file__, ours, top and top.origin, sep="\\n")
if importlib.util.find_spec("triton") is not None:
    import eigenfast.kernels.attribution_pass1, eigenfast.kernels.attribution_pass2
"""


def load_setup_module():
    spec = importlib.util.spec_from_file_location("eigenfast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only under __main__
    return module


@pytest.mark.parametrize("with_cuda", [False, True], ids=["cpu", "cuda"])
def test_extension_sources_map_to_distinct_objects(with_cuda):
    """Two sources with one stem compile to one object file: ninja refuses the build
    ("multiple rules generate ...") and a plain build silently links only one of them."""
    sources = load_setup_module().extension_sources(with_cuda)
    assert sources and all((ROOT / source).is_file() for source in sources)
    objects = [os.path.splitext(source)[0] + ".o" for source in sources]
    assert len(set(objects)) == len(objects), sources
    if with_cuda:
        assert any(source.endswith(".cu") for source in sources)


def test_pyproject_lists_every_package():
    """Packages are listed in pyproject.toml, not found (discovery would take the model
    folders under eigenfast/builtin for packages): a new subpackage missing from the list
    would not install. eigenfast.kernels is the link to kernels/, with no __init__.py."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools_config = config["tool"]["setuptools"]
    listed = set(setuptools_config["packages"])
    # rglob does not follow the eigenfast/kernels link, and kernels/ has no __init__.py.
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "eigenfast").rglob("__init__.py")}
    assert on_disk | {"eigenfast.kernels"} == listed
    assert not any(name.split(".")[0] != "eigenfast" for name in listed)
    assert "torch" not in " ".join(config["build-system"]["requires"])
    # Data files from package-data alone: with include-package-data on, setuptools warns
    # that each model folder under eigenfast/builtin "would be ignored" as a package.
    assert setuptools_config["include-package-data"] is False


def test_kernels_folder_is_the_package_eigenfast_kernels_and_no_package_of_its_own():
    link = ROOT / "eigenfast" / "kernels"
    assert link.is_symlink() and os.readlink(link) == "../kernels"  # relative: survives a clone
    assert not (ROOT / "kernels" / "__init__.py").exists()


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "EIGENFAST_DISABLE_EXTENSION": "0"}


def test_top_level_kernels_from_the_repository_root_is_the_installed_one(tmp_path):
    """`python -m ...` and `python -c` from the repository root put it first on sys.path.
    There `import kernels` must give what the environment has installed (Hugging Face's
    kernels, which transformers imports), and eigenfast.kernels must still load the
    Triton kernels (in Triton's interpreter, so on a CPU too)."""
    env = {**clean_env(), "TRITON_INTERPRET": "1"}
    where = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec and spec.origin)"
    installed = run([sys.executable, "-c", where], cwd=tmp_path, env=env).stdout.strip()
    from_root = run([sys.executable, "-c", where], cwd=ROOT, env=env).stdout.strip()
    if installed == "None":  # no `kernels` installed: at most our folder as a namespace
        assert from_root == "None"
    else:
        assert from_root == installed
        run([sys.executable, "-c", "import kernels"], cwd=ROOT, env=env)
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (it is on Linux x86-64 only)")
    loaded = run([sys.executable, "-c", "import eigenfast.kernels.attribution_pass1 as k; print(k.__file__)"],
                 cwd=ROOT, env=env)
    assert Path(loaded.stdout.strip()).resolve() == (ROOT / "kernels" / "attribution_pass1.py").resolve()


def test_editable_install_maps_kernels_into_the_package(tmp_path):
    """In the environment running the tests, when it holds this checkout as an editable
    install (as `make test` sets up): eigenfast.kernels resolves to kernels/ from any
    folder, and no top-level `kernels` is ours."""
    env = clean_env()
    probe = "import eigenfast, sys; print(eigenfast.__file__)"
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    if found.returncode != 0 or not Path(found.stdout.strip()).resolve().is_relative_to(ROOT):
        pytest.skip("this checkout is not installed in this environment (pip install --no-build-isolation -e .)")
    result = run([sys.executable, "-c", IMPORT_CHECK], cwd=tmp_path, env=env)
    assert Path(result.stdout.splitlines()[1]) == (ROOT / "kernels").resolve()


# -- the CUDA arch list a build picks ----------------------------------------------------


def fake_torch(cuda: str | None, gpu: bool, archs: list[str]) -> SimpleNamespace:
    return SimpleNamespace(__version__="2.13.0", version=SimpleNamespace(cuda=cuda),
                           cuda=SimpleNamespace(is_available=lambda: gpu, get_arch_list=lambda: archs))


def test_default_cuda_archs_are_torchs_within_what_nvcc_compiles():
    default_cuda_archs = load_setup_module().default_cuda_archs
    torch_codes = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert default_cuda_archs(torch_codes, ["sm_80", "sm_86", "sm_90", "sm_100"]) == "8.0;8.6;9.0;10.0+PTX"
    assert default_cuda_archs(["sm_90a", "sm_121"], []) == "9.0a;12.1+PTX"  # nvcc could not say
    assert default_cuda_archs([], ["sm_80", "sm_90"]) == "8.0;9.0+PTX"  # torch could not say


def test_cuda_arch_list_without_a_gpu_is_set_and_said(monkeypatch):
    """No GPU visible and no TORCH_CUDA_ARCH_LIST: torch's own choice would fail with an
    IndexError, so the build sets the list; a list or a GPU already there is left alone."""
    setup_module = load_setup_module()
    monkeypatch.setattr(setup_module, "nvcc_gpu_codes", lambda cuda_home: ["sm_80", "sm_90"])
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    archs, described = setup_module.cuda_arch_list(fake_torch("13.0", False, ["sm_75", "sm_80", "sm_90"]), "/cuda")
    assert archs == "8.0;9.0+PTX" and described.startswith("8.0;9.0+PTX (no GPU visible")
    assert setup_module.cuda_arch_list(fake_torch("13.0", True, ["sm_80"]), "/cuda") == (None, "the visible GPUs")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert setup_module.cuda_arch_list(fake_torch("13.0", False, ["sm_80"]), "/cuda")[0] is None


def test_toolkit_of_nvcc_on_path_is_where_nvcc_says(monkeypatch, tmp_path):
    """A wrapper script on PATH (as /usr/local/bin/nvcc here) that runs the real nvcc:
    the toolkit is the real one's, not the folder above the wrapper."""
    toolkit = tmp_path / "cuda-13.0"
    (toolkit / "bin").mkdir(parents=True)
    wrapper = tmp_path / "wrapper" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\necho '#$ TOP={toolkit}/bin/..' >&2\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", str(wrapper.parent))
    assert load_setup_module().toolkit_of_nvcc_on_path() == str(toolkit)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert load_setup_module().toolkit_of_nvcc_on_path() is None


def test_cpu_only_build_reasons(monkeypatch, tmp_path):
    setup_module = load_setup_module()
    monkeypatch.delenv(setup_module.CPU_ONLY_ENV, raising=False)
    cuda_torch = fake_torch("13.0", False, [])
    assert setup_module.cpu_only_reason(fake_torch(None, False, []), None) == "torch is a CPU build"
    assert "no CUDA toolkit" in setup_module.cpu_only_reason(cuda_torch, None)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    # nvcc without the headers: /usr/local when the nvcc on PATH is /usr/local/bin/nvcc
    assert "no CUDA toolkit" in setup_module.cpu_only_reason(cuda_torch, str(tmp_path))
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").touch()
    assert setup_module.cpu_only_reason(cuda_torch, str(tmp_path)) is None
    monkeypatch.setenv(setup_module.CPU_ONLY_ENV, "1")
    assert setup_module.cpu_only_reason(cuda_torch, str(tmp_path)) == "EIGENFAST_CPU_ONLY=1"


# -- real installs -----------------------------------------------------------------------


def copy_of_the_repository(dest: Path) -> Path:
    """What a clean clone holds: no virtual environment, build output or compiled op."""
    ignore = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "*.so", "__pycache__",
                                    ".pytest_cache", ".eigenfast-installed*", "out")
    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    return dest


def find_python(version: str) -> str | None:
    """An interpreter of that minor version: `pythonX.Y` on PATH, else the newest pyenv
    build of it (pyenv's shims only run the versions it has selected)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    builds = sorted(root.glob(f"versions/{version}.*/bin/python{version}"),
                    key=lambda path: [int(part) for part in re.findall(r"\d+", path.parts[-3])])
    for candidate in [shutil.which(f"python{version}"), *reversed([str(path) for path in builds])]:
        if candidate is None:
            continue
        probe = subprocess.run([candidate, "-c", "import sys, venv; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    return None


@dataclass
class FreshInstall:
    venv: Path
    build_output: str  # pip --verbose: the build's own lines
    import_check: str  # IMPORT_CHECK's output, run from outside the source tree
    with_cuda: bool  # eigenfast._C.with_cuda
    seconds: float


def install_into_fresh_venv(python_found: str, where: Path) -> FreshInstall:
    """A new venv of that Python, the pinned set, and a regular install of a clean copy
    of this repository, checked from outside the source."""
    started = time.perf_counter()
    env = clean_env()
    venv = where / "venv"
    run([python_found, "-m", "venv", str(venv)], env=env)
    python = str(venv / "bin" / "python")
    # --no-compile: pip byte-compiles every file it installs (20 s of CPU for torch's 2,300
    # alone); the import check compiles only what it imports.
    pip = [python, "-m", "pip", "install", "--no-compile", "-c", str(CONSTRAINTS)]
    run([*pip, "--quiet", "--upgrade", "pip", "setuptools", "wheel"], env=env)
    run([*pip, "--quiet", "torch"], env=env)
    source = copy_of_the_repository(where / "src")
    # --verbose: pip shows the build's own output only then
    build = run([*pip, "--verbose", "--no-build-isolation", f"{source}[test]"], env=env, cwd=where)
    checked = run([python, "-c", IMPORT_CHECK], env=env, cwd=where)
    with_cuda = run([python, "-c", "import torch, eigenfast._C as c; print(c.with_cuda)"], env=env, cwd=where)
    return FreshInstall(venv, build.stdout + build.stderr, checked.stdout, with_cuda.stdout.strip() == "1",
                        time.perf_counter() - started)


@pytest.fixture(scope="module")
def fresh_installs(tmp_path_factory) -> Iterator[dict[str, Future[FreshInstall]]]:
    """The install on each Python found, all started at once: most of each is downloading
    and unpacking torch (a CUDA build, 1.3 GB, for 3.12 and 3.13), which overlap."""
    found = {version: find_python(version) for version in PYTHONS}
    with ThreadPoolExecutor(max_workers=len(PYTHONS)) as pool:
        yield {version: pool.submit(install_into_fresh_venv, python, tmp_path_factory.mktemp(f"python{version}"))
               for version, python in found.items() if python is not None}


@pytest.mark.slow
@pytest.mark.parametrize("version", PYTHONS)
def test_fresh_venv_regular_install(fresh_installs, version):
    """The pinned set and a regular install into a new venv of each supported Python the
    machine has. On Linux, torch from PyPI is a CUDA build for Python 3.12 and 3.13: with
    nvcc there and no GPU, the extension is built for torch's archs (see setup.py)."""
    if version not in fresh_installs:
        pytest.skip(f"no Python {version} here (python{version} on PATH or a pyenv build of it)")
    install = fresh_installs[version].result()
    assert "Package would be ignored" not in install.build_output
    built = re.search(r"eigenfast: building eigenfast\._C (.*)", install.build_output)
    assert built, "the build did not say which extension it made"
    assert install.with_cuda == built[1].startswith("with CUDA kernels"), built[0]
    installed = Path(install.import_check.splitlines()[0])
    assert installed.is_relative_to(install.venv), installed  # the installed copy, not the source tree
    print(f"Python {version}: fresh venv + pinned set + regular install + import: {install.seconds:.0f} s; "
          f"{built[0]}")
