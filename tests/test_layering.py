"""The layering rules of docs/DESIGN.md ("Layering"), checked by reading every import.

Each folder of eigenfast/ is a layer or a feature. A module may import only from the
layers its folder lists below (and from its own folder); the features (eigenprune,
circuit, edges) never import one another, and serving imports no feature. A new folder
must be given its place here, so the rules cannot go stale silently.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "eigenfast"

BASE = {"errors", "ops", "kernels"}
SHARED = BASE | {"adapters", "rewrite", "runtime", "data"}
FEATURE = SHARED | {"saving"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "ops": {"errors"},
    "kernels": set(),
    "adapters": {"errors"},
    "rewrite": {"adapters", "errors", "ops"},
    "data": {"adapters", "errors"},
    "runtime": {"adapters", "data", "errors", "rewrite"},
    "serving": {"adapters", "errors", "ops", "rewrite", "runtime"},
    "builtin": {"adapters", "data", "errors", "rewrite", "runtime"},
    "saving": {"adapters", "builtin", "data", "errors", "rewrite", "runtime"},
    "eigenprune": FEATURE,
    "circuit": FEATURE,
    "edges": FEATURE,
    "testing": SHARED | {"eigenprune", "circuit", "edges"},
    "commands": {"*"},
    "__init__": {"*"},
    "cli": {"*"},
}
FEATURES = {"eigenprune", "circuit", "edges"}
# Files outside the table, each with the reason.
EXEMPT = {
    "saving/hub_module.py": "copied into every save and run by transformers, so it calls only the public "
                            "API (eigenfast.load), the one name that stays when modules move",
}


def layer_of(module: str) -> str:
    """``eigenfast.circuit.extract`` -> ``circuit``; ``eigenfast.cli`` -> ``cli``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every eigenfast import in ``path``, functions' bodies included."""
    module = ".".join(("eigenfast", *path.relative_to(PACKAGE).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{alias.name}" for alias in node.names] if node.module is None else [target]
            else:
                names = [node.module or ""]
            found += [(node.lineno, name) for name in names if name.startswith("eigenfast")]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("eigenfast")]
    return found


def test_every_folder_has_a_place():
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert folders | modules <= set(ALLOWED) | {"_C"}, (folders | modules) - set(ALLOWED)


def test_imports_follow_the_layers():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).as_posix() in EXEMPT:
            continue
        here = layer_of(".".join(("eigenfast", *path.relative_to(PACKAGE).with_suffix("").parts)))
        allowed = ALLOWED[here]
        for line, target in imports(path):
            there = layer_of(target)
            if there == here and target != "eigenfast" or "*" in allowed or there in allowed:
                continue
            broken.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {target} ({there})")
    assert not broken, "\n".join(broken)


def test_features_do_not_import_each_other():
    """Stated on its own because it is the rule that keeps the features independent."""
    for feature in FEATURES:
        assert not ALLOWED[feature] & (FEATURES - {feature})


def test_importing_eigenfast_registers_no_flop_formulas():
    """The serving cost model teaches torch's FLOP counter on first use, not on import."""
    code = (
        "import eigenfast, eigenfast.serving, torch\n"
        "from torch.utils.flop_counter import flop_registry\n"
        "assert torch.ops.eigenfast.token_bias_linear.default not in flop_registry\n"
        "assert torch.ops.eigenfast.token_bias_linear not in flop_registry\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
