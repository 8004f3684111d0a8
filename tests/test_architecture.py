"""The house rules that keep the code easy to live in, read from the source with `ast`: no module imports another's
private helpers, package modules import each other in one direction only (no cycle, counting imports inside
functions), and the scripts stay within the agreed size."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "paperqa_tune"
SCRIPTS = ("generate_qa.py", "train_qlora_hf.py", "eval_compare.py", "quick_infer.py")
MAX_SCRIPT_LINES = 900


def sources() -> list[Path]:
    return [ROOT / s for s in SCRIPTS] + [ROOT / "common.py"] + sorted(PACKAGE.glob("*.py"))


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for every import in the file, at any depth (inside functions too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_no_module_imports_another_modules_private_helpers():
    ours = {"common"} | {f"paperqa_tune.{p.stem}" for p in PACKAGE.glob("*.py")}
    found = [f"{path.name}: from {module} import {name}" for path in sources()
             for module, names in imports(path) if module in ours
             for name in names if name.startswith("_") and not name.startswith("__")]
    assert found == []


def test_package_modules_import_each_other_in_one_direction():
    graph = {p.stem: set() for p in PACKAGE.glob("*.py")}
    for path in PACKAGE.glob("*.py"):
        for module, names in imports(path):
            if module.startswith("paperqa_tune."):
                graph[path.stem].add(module.split(".")[1])
            elif module == "paperqa_tune":
                graph[path.stem].update(n for n in names if n in graph)
    cycles = [(a, b) for a in graph for b in graph[a] if a != b and a in reachable(graph, b)]
    assert cycles == []


def reachable(graph: dict[str, set], start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_scripts_stay_within_the_agreed_size():
    sizes = {s: len((ROOT / s).read_text(encoding="utf-8").splitlines()) for s in SCRIPTS}
    assert all(n <= MAX_SCRIPT_LINES for n in sizes.values()), sizes
