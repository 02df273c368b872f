"""The worker engine stays split along its seams: no function in its modules runs over 60 lines."""

import ast
from pathlib import Path

import pytest

ENGINE_MODULES = [
    "engine",
    "session",
    "checkpoint",
    "exchange",
    "phases",
    "speculative",
    "window_guidance",
]
MAX_FUNCTION_LINES = 60
ROOT = Path(__file__).resolve().parents[2] / "gpu_worker"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


@pytest.mark.parametrize("module", ENGINE_MODULES)
def test_no_engine_function_is_over_60_lines(module):
    path = ROOT / f"{module}.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = list(_functions(tree))
    assert functions, f"{path} defines no function"
    too_long = {
        f"{f.name} (line {f.lineno})": f.end_lineno - f.lineno + 1
        for f in functions
        if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert not too_long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_the_length_check_sees_a_long_function():
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (long,) = _functions(ast.parse(f"def long():\n{body}\n"))
    assert long.end_lineno - long.lineno + 1 == MAX_FUNCTION_LINES + 1
