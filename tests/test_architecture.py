"""The house rules that keep the code easy to live in, read from the source with `ast`: no module imports another's
private helpers, package modules import each other in one direction only (no cycle, counting imports inside
functions), and the scripts stay within the agreed size."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "paperqa_tune"
SCRIPTS = ("generate_qa.py", "train_qlora_hf.py", "eval_compare.py", "quick_infer.py")
MAX_SCRIPT_LINES = 700


def package_modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the package, subpackages included."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def sources() -> list[Path]:
    return [ROOT / s for s in SCRIPTS] + [ROOT / "common.py"] + list(package_modules().values())


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
    ours = {"common"} | set(package_modules())
    found = [f"{path.relative_to(ROOT)}: from {module} import {name}" for path in sources()
             for module, names in imports(path) if module in ours
             for name in names if name.startswith("_") and not name.startswith("__")]
    assert found == []


def test_package_modules_import_each_other_in_one_direction():
    modules = package_modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names in imports(path):
            # `from paperqa_tune.train import packing` imports the module paperqa_tune.train.packing
            graph[name].update(f"{module}.{n}" for n in names if f"{module}.{n}" in modules)
            if module in modules and not path.name == "__init__.py":
                graph[name].add(module)
    for name in list(graph):
        graph[name].discard(name.rpartition(".")[0])  # a subpackage's lazy __init__ is not an import cycle
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


MAX_SCRIPT_FUNCTION_LINES = 80  # a script reads as a list of stages; only the argument parser may be longer


def test_no_script_function_is_longer_than_a_screen():
    long = []
    for s in SCRIPTS:
        for node in ast.walk(ast.parse((ROOT / s).read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser":
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_SCRIPT_FUNCTION_LINES:
                    long.append(f"{s}:{node.lineno} {node.name}() is {lines} lines")
    assert long == []


def test_the_package_never_imports_the_scripts_common_module():
    """common.py names the package's chat format and file helpers for the scripts; the package itself works
    without the repo root on sys.path."""
    found = [f"{path.relative_to(ROOT)}: {module}" for path in package_modules().values()
             for module, _ in imports(path) if module == "common" or module.startswith("common.")]
    assert found == []


def test_every_name_a_stage_lists_is_importable():
    """Each subpackage's docstring is its API: every name on its lines resolves (the last one before a
    parenthesis too), and nothing unlisted is offered."""
    import importlib

    for stage in ("qa", "train", "evaluate"):
        pkg = importlib.import_module(f"paperqa_tune.{stage}")
        listed = [line.split("(")[0].split(None, 1) for line in pkg.__doc__.splitlines() if line.startswith("    ")
                  and not line.startswith("     ")]
        names = {n.strip() for _, rest in listed for n in rest.split(",") if n.strip()}
        assert names and names <= set(pkg.__all__), (stage, names - set(pkg.__all__))
        for name in names:
            assert getattr(pkg, name) is not None, (stage, name)
    from paperqa_tune.evaluate import JudgeConfig, SIDES  # the names before "(" on their lines
    assert JudgeConfig.__name__ == "JudgeConfig" and "base" in SIDES[0]
