"""The layers hold (docs/design.md section 2, "Layers"): a test, not a memory.

    hybridiff_tools/        bench, the default model's training and evaluation, quality metrics
    hybridiff_launch/       the CLI, the local cluster, the in-process pair, tiny models
    coordinator/  |  gpu_worker/     the two processes; never import each other
    hybridiff/    wire format, protocol, validation, errors, telemetry, security, serving, client

A module may import its own package and the packages below it, never above, and the two roles
never import each other. An import inside a function is allowed only for an optional or heavy
dependency, with a ``# deferred: <reason>`` comment on its line or the line above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK = {"hybridiff": 0, "coordinator": 1, "gpu_worker": 1, "hybridiff_launch": 2, "hybridiff_tools": 3}
GENERATED = ("hybridiff/v1", "hybridiff/internal")


def _sources(root: Path):
    for package in RANK:
        for path in sorted((root / package).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if not rel.startswith(GENERATED):
                yield package, rel, path


def _imported_packages(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.split(".")[0]]
    return []


def layer_violations(root: Path) -> list[str]:
    """Every import against the layers under ``root``, as "file:line: what"."""
    found = []
    for package, rel, path in _sources(root):
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            for target in _imported_packages(node):
                if target not in RANK or target == package:
                    continue
                if RANK[target] > RANK[package]:
                    found.append(
                        f"{rel}:{node.lineno}: {package} (layer {RANK[package]}) imports {target} "
                        f"(layer {RANK[target]})"
                    )
                elif RANK[target] == RANK[package]:
                    found.append(f"{rel}:{node.lineno}: the role {package} imports the role {target}")
    return found


def deferred_imports_without_reason(root: Path) -> list[str]:
    """Imports inside functions that do not say why they are deferred."""
    found = []
    for _, rel, path in _sources(root):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines), rel)):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and not _says_why(lines, node):
                    found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    return sorted(set(found))


def _says_why(lines: list[str], node: ast.AST) -> bool:
    """A ``# deferred:`` comment on the import, or atop the block of imports and comments it is in."""
    if any("# deferred:" in line.lower() for line in lines[node.lineno - 1 : node.end_lineno]):
        return True
    i = node.lineno - 2
    while i >= 0:
        text = lines[i].strip()
        if "# deferred:" in text.lower():
            return True
        if not (text.startswith(("#", "import ", "from ")) or text == ""):
            return False
        i -= 1
    return False


def test_the_tree_keeps_its_layers():
    assert layer_violations(ROOT) == []


def test_function_level_imports_say_why():
    assert deferred_imports_without_reason(ROOT) == []


@pytest.mark.parametrize(
    "package,source,expected",
    [
        ("hybridiff", "import coordinator.pool\n", "hybridiff (layer 0) imports coordinator (layer 1)"),
        ("coordinator", "import gpu_worker.engine\n", "the role coordinator imports the role gpu_worker"),
        (
            "hybridiff_launch",
            "from hybridiff_tools.quality import psnr\n",
            "hybridiff_launch (layer 2) imports hybridiff_tools (layer 3)",
        ),
    ],
)
def test_a_lower_layer_importing_a_higher_one_fails(tmp_path, package, source, expected):
    for name in RANK:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / package / "bad.py").write_text(source)
    assert layer_violations(tmp_path) == [f"{package}/bad.py:1: {expected}"]


def test_an_unexplained_deferred_import_fails(tmp_path):
    for name in RANK:
        (tmp_path / name).mkdir()
    (tmp_path / "hybridiff_launch" / "cli.py").write_text(
        "def ok():\n    import torch  # deferred: heavy\n\n\ndef bad():\n    import json\n"
    )
    assert deferred_imports_without_reason(tmp_path) == ["hybridiff_launch/cli.py:6: import json"]
