"""Packaging: the extension's sources, the package list, and real installs.

The slow test builds a fresh virtual environment, installs torch and this repository
(a regular install, not editable) and imports the result from outside the repository.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"

# Run in a child from outside the repository, so only the installed package is found.
IMPORT_CHECK = """
import importlib.util, sys
from pathlib import Path
import eigenfast, eigenfast.kernels, eigenfast.ops
assert eigenfast.ops.extension_available(), "eigenfast._C did not load"
import eigenfast._C
ours = Path(eigenfast.kernels.__file__).resolve().parent
top = importlib.util.find_spec("kernels")
assert top is None or Path(top.origin).resolve().parent != ours, "a top-level `kernels` is ours"
print(eigenfast.__file__, ours, sep="\\n")
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
    """Packages are listed in pyproject.toml (discovery cannot map kernels/ to
    eigenfast.kernels): a new subpackage missing from the list would not install."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    mapping = config["tool"]["setuptools"]["package-dir"]
    assert mapping == {"eigenfast.kernels": "kernels"}
    on_disk = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "eigenfast").rglob("__init__.py")}
    assert on_disk | {"eigenfast.kernels"} == listed
    assert not any(name.split(".")[0] != "eigenfast" for name in listed)
    assert "torch" not in " ".join(config["build-system"]["requires"])


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "EIGENFAST_DISABLE_EXTENSION": "0"}


def test_editable_install_maps_kernels_into_the_package(tmp_path):
    """In the environment running the tests, when it holds this checkout as an editable
    install (as `make test` sets up): eigenfast.kernels resolves to kernels/, and no
    top-level `kernels` is ours."""
    env = clean_env()
    probe = "import eigenfast, sys; print(eigenfast.__file__)"
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    if found.returncode != 0 or not Path(found.stdout.strip()).resolve().is_relative_to(ROOT):
        pytest.skip("this checkout is not installed in this environment (pip install --no-build-isolation -e .)")
    result = run([sys.executable, "-c", IMPORT_CHECK], cwd=tmp_path, env=env)
    assert Path(result.stdout.splitlines()[1]) == (ROOT / "kernels").resolve()
    if importlib.util.find_spec("triton") is not None:
        run([sys.executable, "-c", "import eigenfast.kernels.attribution_pass1"], cwd=tmp_path, env=env)


def copy_of_the_repository(dest: Path) -> Path:
    """What a clean clone holds: no virtual environment, build output or compiled op."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__",
                                    ".pytest_cache", ".eigenfast-installed*", "out")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.mark.slow
def test_fresh_venv_regular_install(tmp_path):
    started = time.perf_counter()
    env = clean_env()
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    run([base_python, "-m", "venv", str(venv)], env=env)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "--quiet"]
    run([*pip, "--upgrade", "pip", "setuptools", "wheel"], env=env)
    run([*pip, TORCH], env=env)
    source = copy_of_the_repository(tmp_path / "src")
    run([*pip, "--no-build-isolation", str(source)], env=env, cwd=tmp_path)
    result = run([python, "-c", IMPORT_CHECK], env=env, cwd=tmp_path)
    installed = Path(result.stdout.splitlines()[0])
    assert installed.is_relative_to(venv), installed  # the installed copy, not the source tree
    print(f"fresh venv + torch + regular install + import: {time.perf_counter() - started:.0f} s")
