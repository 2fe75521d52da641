"""The package layout (docs/architecture.md): imports only go down, and nothing imports in a circle.

From the bottom: ``cxr.config`` (the experiments; imports nothing of cxr), then the subpackages in
``LAYERS`` order, then the front ends at the top (``workflow``, ``external``, ``preflight``, ``cli``,
``notebook``). A module may import its own subpackage, any subpackage below it and ``cxr.config``; the
front ends may import anything but each other in a circle. Imports inside functions count too: a lazy
import that goes up is still a dependency that goes up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cxr"
LAYERS = ["common", "data", "models", "evaluate", "report", "inference", "audit", "train"]


def imported_modules(path: Path) -> set[str]:
    """What ``path`` imports from cxr, as dotted names below ``cxr`` (``data.dataset``, ``config``): for
    ``from cxr.a import b`` both ``a`` and ``a.b``, since ``b`` may be a module or a name in ``a``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cxr" and node.level == 0:
            module = node.module.partition(".")[2]
            found |= {module.strip(".")} | {f"{module}.{alias.name}".strip(".") for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path.relative_to(PACKAGE)}: relative import; the layout test reads absolute ones")
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".", 1)[1] for alias in node.names if alias.name.startswith("cxr.")}
    return found


def modules() -> dict[str, Path]:
    return {".".join(path.relative_to(PACKAGE).with_suffix("").parts): path for path in PACKAGE.rglob("*.py")}


def rank(module: str) -> int:
    """0 for cxr.config, 1.. for the subpackages from the bottom, the top for front ends."""
    if module == "config":
        return 0
    head = module.split(".")[0]
    return LAYERS.index(head) + 1 if head in LAYERS else len(LAYERS) + 1


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, imports in graph.items():
        for target in imports:
            same_package = "." in module and target.split(".")[0] == module.split(".")[0]
            if rank(target) >= rank(module) and not same_package and rank(module) <= len(LAYERS):
                wrong.append(f"{module} imports {target}")
    return sorted(wrong)


def cycles_between_front_ends(graph: dict[str, set[str]]) -> list[str]:
    top = {m for m in graph if rank(m) == len(LAYERS) + 1 and not m.startswith("__")}
    edges = {m: {t for t in graph[m] if t in top} for m in top}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in edges[start])

    return sorted(f"{a} <-> {b}" for a in top for b in edges[a] if a < b and reaches(b, a, {b}))


def import_graph() -> dict[str, set[str]]:
    found = modules()
    graph = {}
    for module, path in found.items():
        name = module.removesuffix(".__init__")
        graph[name] = {t for t in imported_modules(path) if t in found or f"{t}.__init__" in found} - {name, ""}
    return graph


def test_every_module_sits_in_a_known_layer():
    for module in modules():
        assert "." not in module or module.split(".")[0] in LAYERS, f"cxr.{module} is in no layer of LAYERS"


def test_imports_only_go_down():
    assert upward_imports(import_graph()) == []


def test_the_front_ends_import_each_other_in_no_circle():
    assert cycles_between_front_ends(import_graph()) == []


def test_the_check_catches_an_import_that_goes_up_and_a_circle():
    graph = {"data.dataset": {"models.classifier", "config", "common.progress"}, "models.classifier": {"data.dataset"},
             "config": {"data.dataset"}, "workflow": {"external"}, "external": {"workflow"}, "cli": {"workflow"}}
    assert upward_imports(graph) == ["config imports data.dataset", "data.dataset imports models.classifier"]
    assert cycles_between_front_ends(graph) == ["external <-> workflow"]


@pytest.mark.parametrize("source, expected", [
    ("from cxr.data.dataset import CLASSES", {"data.dataset", "data.dataset.CLASSES"}),
    ("from cxr.evaluate import metrics as table", {"evaluate", "evaluate.metrics"}),
    ("def f():\n    from cxr import workflow", {"", "workflow"}),
    ("import cxr.train.engine", {"train.engine"}),
])
def test_imports_are_read_also_inside_functions(tmp_path, source, expected):
    path = tmp_path / "module.py"
    path.write_text(source)
    assert imported_modules(path) == expected
