"""requirements*.txt against the constraint files CI installs: every requirement has a floor, CI's floors job
(constraints-floors.txt) pins exactly that floor, constraints.txt pins every requirement, and every runtime
requirement is imported by the code (or needed at run time by one that is, said why below)."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
# Installed only by `pip install torch==2.13.0` here (the CPU build on local disk): its floor cannot be installed.
NOT_AT_FLOOR = {"torch"}
# Runtime requirements no module of ours imports, and what needs them.
INDIRECT = {"accelerate": "transformers loads a bitsandbytes 4-bit model only with accelerate installed"}
IMPORT_NAMES = {}  # distribution -> import name, where they differ


def requirements(name: str) -> dict[str, Requirement]:
    out = {}
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            r = Requirement(line)
            out[canonicalize_name(r.name)] = r
    return out


def pins(name: str) -> dict[str, Version]:
    out = {}
    for line in (ROOT / name).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            pkg, _, version = line.partition("==")
            assert version, f"{name}: {line!r} is not an exact pin"
            out[canonicalize_name(pkg)] = Version(version)
    return out


def floor(r: Requirement) -> Version | None:
    lows = [Version(s.version) for s in r.specifier if s.operator == ">="]
    return max(lows) if lows else None


def test_every_requirement_has_a_floor_that_the_floors_job_pins():
    floors = pins("constraints-floors.txt")
    for file in ("requirements.txt", "requirements-dev.txt"):
        for name, r in requirements(file).items():
            assert floor(r) is not None, f"{file}: {r} has no >= floor"
            if name in NOT_AT_FLOOR:
                continue
            assert floors.get(name) == floor(r), \
                f"constraints-floors.txt pins {name}=={floors.get(name)}, but {file} says {r}: make them agree"


def test_constraints_pin_every_requirement():
    ci = pins("constraints.txt")
    for file in ("requirements.txt", "requirements-dev.txt"):
        for name, r in requirements(file).items():
            if name not in NOT_AT_FLOOR:
                assert name in ci, f"constraints.txt (what CI installs) has no pin for {name}"
                assert ci[name] in r.specifier, f"constraints.txt pins {name}=={ci[name]}, outside {file}'s {r}"


def imported_modules() -> set[str]:
    """Top-level modules imported anywhere in the scripts, the package (its subpackages too) and tools (not the
    tests)."""
    files = [*ROOT.glob("*.py"), *(ROOT / "paperqa_tune").rglob("*.py"), *(ROOT / "tools").glob("*.py")]
    found = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def test_every_runtime_requirement_is_used():
    used = imported_modules()
    for name in requirements("requirements.txt"):
        module = IMPORT_NAMES.get(name, re.sub(r"[-.]", "_", name))
        assert module in used or name in INDIRECT, \
            f"requirements.txt lists {name}, which no script or module imports: drop it or use it"


def test_the_checks_catch_a_mismatch(tmp_path, monkeypatch):
    """The floor check fails when requirements.txt and constraints-floors.txt disagree."""
    (tmp_path / "requirements.txt").write_text("peft>=0.18  # why\n")
    (tmp_path / "requirements-dev.txt").write_text("")
    (tmp_path / "constraints-floors.txt").write_text("peft==0.17.0\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"pins peft==0\.17\.0, but requirements.txt says peft>=0\.18"):
        test_every_requirement_has_a_floor_that_the_floors_job_pins()
