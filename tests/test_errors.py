"""Every error eigenfast raises on purpose is an EigenfastError (keeping its builtin base), with a message to act on."""
from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import pytest
import torch

import eigenfast
from eigenfast.cli import INTERRUPTED, main
from eigenfast.edges import extract_nodes

from conftest import make_data, make_model

PACKAGE = Path(eigenfast.__file__).resolve().parent
BUILTIN_ERRORS = {name for name in dir(builtins) if name.endswith(("Error", "Exception"))}
NOT_YET = {  # files whose own raises this suite does not hold to the rule, and why
    "saving/hub_module.py": "copied into saves and imported by transformers without eigenfast: it can raise nothing of eigenfast's",
}


def builtin_raises(path: Path) -> list[str]:
    """``raise ValueError(...)`` and the like in one file: deliberate errors of a builtin class."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [f"line {node.lineno}: raise {node.exc.func.id}" for node in ast.walk(tree)
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name)
            and node.exc.func.id in BUILTIN_ERRORS]


def test_no_deliberate_error_is_a_plain_builtin_one():
    files = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).as_posix() not in NOT_YET]
    assert len(files) > 40
    offenders = [f"{path.relative_to(PACKAGE)}, {hit}" for path in files for hit in builtin_raises(path)]
    assert not offenders, "raise an eigenfast.errors class (it keeps the builtin base):\n" + "\n".join(offenders)


def test_the_scan_finds_a_plain_raise(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f(x):\n    if x:\n        raise ValueError('bad')\n    raise ArgumentError('fine')\n")
    assert builtin_raises(source) == ["line 3: raise ValueError"]


def test_bad_arguments_are_eigenfast_errors():
    model, data = make_model("gpt2"), make_data()
    calls = {
        "unknown component": lambda: eigenfast.prune(model, data, components=("kq",), progress=False),
        "models have no 'mlp_gate' matrix": lambda: eigenfast.score(model, data, components=("mlp_gate",)),
        "layers [5] go past": lambda: eigenfast.score(model, data, layers=[5], progress=False),
        "ablation must be one of": lambda: eigenfast.extract_circuit(model, data, data, ablation="resample"),
        "ablation must be one of ": lambda: extract_nodes(model, eigenfast.eap(model, data, data, 0.9, progress=False,
                                                                               evaluate=False), data, ablation="x"),
        "target_sparsity must be in": lambda: eigenfast.edge_prune(model, data, data, target_sparsity=1.5),
        "target_sparsity must be in ": lambda: eigenfast.eap(model, data, data, target_sparsity=1.5),
        "threshold must be a number >= 0": lambda: eigenfast.acdc(model, data, data, threshold=-1),
        "at least one candidate": lambda: eigenfast.prune(model, data, p="auto", candidates=(), progress=False),
        "pairs must be one of": lambda: eigenfast.score(model, data, pairs="every"),
    }
    for message, call in calls.items():
        with pytest.raises(eigenfast.EigenfastError, match=re.escape(message.strip())):
            call()


def test_every_error_class_keeps_a_builtin_base():
    classes = [c for c in vars(eigenfast.errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert eigenfast.PositionLimitError in classes and eigenfast.StateError in classes
    for cls in classes:
        assert issubclass(cls, eigenfast.EigenfastError), cls
        builtin = [b for b in cls.__mro__ if b.__module__ == "builtins" and b not in (Exception, BaseException, object)]
        assert cls is eigenfast.EigenfastError or builtin, f"{cls.__name__} has no builtin base"
        assert cls.__name__ in eigenfast.__all__, cls
    assert issubclass(eigenfast.PositionLimitError, IndexError) and issubclass(eigenfast.StateError, RuntimeError)


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("eigenfast.commands.eval.run", interrupted)
    assert main(["eval", "--model", "int_sum_gpt2", "--task", "int_sum"]) == INTERRUPTED == 130
    captured = capsys.readouterr()
    assert captured.err == "interrupted\n" and captured.out == ""


def test_a_hook_outside_a_forward_is_a_state_error():
    from eigenfast.runtime.position_tracker import PositionTracker

    with pytest.raises(eigenfast.StateError, match="outside a model forward"):
        PositionTracker().current()


def test_tensors_stay_untouched_by_refused_calls():
    model = make_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(eigenfast.EigenfastError):
        eigenfast.prune(model, make_data(), components=("nope",), inplace=True, p=0.5, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
