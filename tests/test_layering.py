"""The structure rules of DESIGN.md, checked on the source: who may import whom, private names
stay private, functions fit on a screen."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cfexplain"
MAX_LINES = 80
# Long on purpose: one top-to-bottom drawing of the whole phantom reads better than pieces that
# pass a dozen geometry values between them (see the function's docstring).
LONG_ALLOWED: set[str] = set()


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(), filename=str(path))
    return out


MODULES = _modules()


def _imports(name: str, tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` of every import in ``tree``, relative ones resolved."""
    out = []
    package = (
        name if (PACKAGE.parent / name.replace(".", "/")).is_dir() else name.rpartition(".")[0]
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            out.append((module, [a.name for a in node.names], node.lineno))
    return out


def layering_violations(modules: dict[str, ast.Module]) -> list[str]:
    """Imports of a command's ``__main__``, and of a stage module outside train.py and the stages."""
    bad = []
    for name, tree in modules.items():
        stage_ok = name == "cfexplain.train" or name.startswith("cfexplain.stages")
        for module, names, line in _imports(name, tree):
            targets = [module] + [f"{module}.{n}" for n in names]
            if any(t.endswith(".__main__") for t in targets):
                bad.append(f"{name}:{line} imports {module} ({names})")
            elif not stage_ok and any(t.startswith("cfexplain.stages") for t in targets):
                bad.append(f"{name}:{line} imports {module} ({names})")
    return bad


def private_imports(modules: dict[str, ast.Module]) -> list[str]:
    """``from cfexplain.x import _name`` anywhere in the package."""
    bad = []
    for name, tree in modules.items():
        for module, names, line in _imports(name, tree):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if module.startswith("cfexplain") and private:
                bad.append(f"{name}:{line} imports {private} from {module}")
    return bad


def long_functions(modules: dict[str, ast.Module]) -> list[str]:
    """Functions (and methods) longer than ``MAX_LINES``, from ``def`` to their last line."""
    long = []
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                where = f"{name}.{node.name}"
                if lines > MAX_LINES and where not in LONG_ALLOWED:
                    long.append(f"{where}: {lines} lines")
    return long


def test_no_module_imports_a_command_entry_point_or_a_stage():
    assert not layering_violations(MODULES), "\n".join(layering_violations(MODULES))


def test_no_private_name_crosses_modules():
    assert not private_imports(MODULES), "\n".join(private_imports(MODULES))


def test_functions_fit_on_a_screen():
    assert not long_functions(MODULES), "\n".join(long_functions(MODULES))


def test_the_checks_find_planted_violations():
    planted = {
        "cfexplain.evaluate.report": ast.parse(
            "from cfexplain.explain.__main__ import explain\n"
            "from cfexplain.stages.direction import fit\n"
            "from cfexplain.data.readers import _fit\n"
            "from . import _helper\n"
            "def f():\n" + "    x = 1\n" * MAX_LINES
        ),
        "cfexplain.stages.encoder": ast.parse("from cfexplain.stages._shared import real_batch\n"),
    }
    assert len(layering_violations(planted)) == 2
    assert [v.split(" imports ")[1] for v in private_imports(planted)] == [
        "['_fit'] from cfexplain.data.readers",
        "['_helper'] from cfexplain.evaluate",
    ]
    assert long_functions(planted) == [f"cfexplain.evaluate.report.f: {MAX_LINES + 1} lines"]
