"""Every function in ``src/cxr`` fits on one screen (the house rule: at most 60 lines, decorators and docstring
included), so a newcomer reads each one whole."""

from __future__ import annotations

import ast
from pathlib import Path

import cxr

PACKAGE = Path(cxr.__file__).parent
MOST_LINES = 60


def long_functions(source: str, most: int = MOST_LINES) -> list[tuple[str, int, int]]:
    """``(name, first line, lines)`` of each function or method in ``source`` longer than ``most`` lines."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
            lines = node.end_lineno - first + 1
            if lines > most:
                found.append((node.name, first, lines))
    return found


def _function(name: str, body_lines: int, decorated: bool = False, indent: str = "") -> str:
    body = "".join(f"{indent}    x = {i}\n" for i in range(body_lines))
    return f"{indent}@staticmethod\n" * decorated + f"{indent}def {name}():\n{body}"


def test_the_count_takes_the_def_its_decorators_and_every_body_line():
    assert long_functions(_function("fits", 59)) == []  # 60 lines with its def
    assert long_functions(_function("one_over", 60)) == [("one_over", 1, 61)]
    method = "class Holder:\n" + _function("method", 59, decorated=True, indent="    ")
    assert long_functions(method) == [("method", 2, 61)]  # the decorator's line counts
    nested = _function("outer", 10) + _function("inner", 70, indent="    ")
    assert [name for name, _, _ in long_functions(nested)] == ["outer", "inner"]


def test_no_function_in_the_package_is_over_60_lines():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 10  # the scan found the package
    too_long = [f"{path.relative_to(PACKAGE)}:{first} {name} ({lines} lines)"
                for path in modules for name, first, lines in long_functions(path.read_text(encoding="utf-8"))]
    assert too_long == [], f"functions over {MOST_LINES} lines: {too_long}"
