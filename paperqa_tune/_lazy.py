"""A subpackage's public API, named in its docstring and imported on first use (PEP 562 module __getattr__).

Each stage's `__init__` lists `module   name, name, ...` lines; `from paperqa_tune.qa import parse_reply` then
imports only `paperqa_tune.qa.replies`, so a stage never pays for another's imports (torch, datasets)."""
from __future__ import annotations

import importlib
import re


def lazy_exports(package: str, doc: str):
    where: dict[str, str] = {}
    module = None
    for line in doc.splitlines():
        m = re.match(r"\s{4}(\w+)\s{2,}(.*)", line)
        if m:
            module, rest = m.group(1), m.group(2)
            where[module] = module
        elif module and re.match(r"\s{8,}\S", line):
            rest = line
        else:
            module = None
            continue
        for name in re.findall(r"\b([A-Za-z_]\w*)\b(?:,|$)", rest.split("(")[0].strip()):
            where.setdefault(name, module)

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        mod = importlib.import_module(f"{package}.{where[name]}")
        return mod if where[name] == name else getattr(mod, name)

    return __getattr__, sorted(where)
