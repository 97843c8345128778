"""The architecture's rules, checked: dependencies point one way (import-linter contracts in
pyproject.toml, also run by .ci/run), no import cycle, and no module replaces another object's
methods (transforms wrap or compose modules)."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "gemmaforge"


def _lint_imports(config: Path, src_root: Path):
    exe = Path(sys.executable).with_name("lint-imports")
    env = {"PYTHONPATH": str(src_root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(exe), "--config", str(config), "--no-cache"], capture_output=True, text=True,
                          env=env, cwd=src_root, timeout=300)


def test_import_contracts_hold():
    r = _lint_imports(REPO / "pyproject.toml", REPO / "src")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout and "BROKEN" not in r.stdout


@pytest.mark.parametrize("module,line,contract", [
    # a layer reaching up (the model importing the trainer)
    ("layers/norm.py", "from ..train import trainer  # noqa", "layers: every module imports only the layers below"),
    # a cycle inside one package, through an import inside a function
    ("parallel/dims.py", "def _late():\n    from . import parallelize  # noqa\n", "no import cycle"),
    # one family importing another
    ("models/mistral/model.py", "from ..gemma3 import model as _g3  # noqa", "models: the registry joins the families"),
])
def test_import_check_fails_when_a_rule_is_broken(tmp_path, module, line, contract):
    """The same check on a copy of the package with one bad import added reports that contract BROKEN."""
    src = tmp_path / "src"
    shutil.copytree(SRC, src / "gemmaforge", ignore=shutil.ignore_patterns("__pycache__"))
    target = src / "gemmaforge" / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    cfg = tmp_path / "pyproject.toml"
    cfg.write_text((REPO / "pyproject.toml").read_text())
    r = _lint_imports(cfg, src)
    assert r.returncode != 0, r.stdout[-2000:]
    broken = [ln for ln in r.stdout.splitlines() if ln.rstrip().endswith("BROKEN")]
    assert any(ln.startswith(contract) for ln in broken), r.stdout[-3000:]


def method_replacements(files) -> list[str]:
    """Assignments to a ``forward`` / ``__call__`` attribute, ``types.MethodType``, and ``setattr`` /
    ``object.__setattr__`` of a forward-like name, in ``files``."""
    found = []
    for f in files:
        tree = ast.parse(Path(f).read_text(), str(f))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in ("forward", "__call__"):
                    found.append(f"{f}:{node.lineno}: assigns .{t.attr}")
            if isinstance(node, ast.Attribute) and node.attr == "MethodType":
                found.append(f"{f}:{node.lineno}: types.MethodType")
            if isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                    and isinstance(node.args[1].value, str) \
                    and re.fullmatch(r"forward|__call__|[a-z_]+_forward|head_weight", node.args[1].value):
                fn = node.func
                name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
                if name in ("__setattr__", "setattr"):
                    found.append(f"{f}:{node.lineno}: {name}(..., {node.args[1].value!r})")
    return found


def test_no_module_replaces_methods_of_another_object():
    """Transforms wrap or compose modules: nothing in src/ replaces a method on an object."""
    assert method_replacements(sorted(SRC.rglob("*.py"))) == []


def test_the_scan_sees_a_replaced_forward(tmp_path):
    """The scan is not vacuous: the patterns the old code used are found."""
    bad = tmp_path / "bad.py"
    bad.write_text("import types\nobject.__setattr__(layer, 'forward', types.MethodType(f, layer))\n"
                   "m.forward = g\nsetattr(model, 'head_weight', h)\n")
    found = method_replacements([bad])
    assert len(found) == 4, found
