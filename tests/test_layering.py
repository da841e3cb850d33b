"""The package's floors: each module imports only from its own floor or the floors below, at module
level or inside a function alike (a lazy import is still a dependency). docs/architecture.md draws
them; this list is the one place they are written down. A registry's "softprompt.module:name"
string (imported on first use) counts as an import too."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "softprompt"
REGISTRY_ENTRY = re.compile(r"^softprompt(\.\w+)+:\w+$")

FLOORS = [  # bottom to top: (floor, the packages or modules on it)
    ("core", ["softprompt.core"]),  # geometry, device, defaults, atomic writes, int8 kernels
    ("hf", ["softprompt.hf"]),  # the one boundary with transformers: caches, hooks, the prefix, quantization
    ("methods", ["softprompt.methods"]),  # prompt tuning, prefix tuning, P-tuning
    ("loops", ["softprompt.loops"]),  # data, decoding, evaluation, the training loop
    ("families", ["softprompt.families"]),  # causal, seq2seq, encoder: what differs between model kinds
    ("classify", ["softprompt.classify"]),  # classification on any family
    ("io", ["softprompt.io"]),  # bases, artifacts, cards, PEFT's format
    ("store", ["softprompt.store"]),  # named, versioned tasks and their compiled prefixes
    ("serve", ["softprompt.serve"]),  # the engines, then the HTTP layer
    ("runs", ["softprompt.runs", "softprompt.auditing"]),  # training runs, comparison, demo, the audit, the Python API
    ("cli", ["softprompt.cli", "softprompt"]),  # the command line and the package root
    ("vllm", ["softprompt.vllm"]),  # vLLM's KV connector, run in vLLM's own venv: nothing below imports it
]


def floor_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is on no floor: add it to FLOORS"
    return level


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path


def imports(name: str, path: Path):
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "softprompt":  # `from softprompt import hf`: the modules named
                for alias in node.names:
                    yield node.lineno, f"softprompt.{alias.name}"
            elif target.startswith("softprompt."):
                yield node.lineno, target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("softprompt."):
                    yield node.lineno, alias.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and REGISTRY_ENTRY.match(node.value):
            yield node.lineno, node.value.split(":")[0]  # "module:name", imported on first use (a registry)


def test_every_module_is_on_a_floor():
    for name, _ in modules():
        floor_of(name)


def test_imports_only_point_down():
    upward = []
    for name, path in modules():
        mine = floor_of(name)
        for line, target in imports(name, path):
            if target == "softprompt.__version__" or target == "softprompt":
                continue  # the version string lives at the root and imports nothing
            theirs = floor_of(target)
            if theirs > mine:
                upward.append(f"{path.relative_to(ROOT.parent)}:{line} ({FLOORS[mine][0]}) imports {target} "
                              f"({FLOORS[theirs][0]})")
    assert not upward, "imports pointing up a floor:\n" + "\n".join(upward)


def test_the_floors_are_the_ones_documented():
    import re

    doc = (ROOT.parent / "docs" / "architecture.md").read_text()
    drawn = re.findall(r"^  (\w+) +softprompt", doc, flags=re.M)  # the diagram's rows, top floor first
    assert drawn == [floor for floor, _ in reversed(FLOORS)], f"docs/architecture.md draws {drawn}"


@pytest.mark.parametrize("floor", [f for f, _ in FLOORS])
def test_each_floor_exists(floor):
    prefixes = dict(FLOORS)[floor]
    assert any((ROOT.parent / (p.replace(".", "/") + ext)).exists() for p in prefixes for ext in ("", ".py"))


def test_registry_strings_count_as_imports():
    found = {target for _, target in imports("softprompt.serve.engines", ROOT / "serve" / "engines.py")}
    assert {"softprompt.serve.engine", "softprompt.serve.seq2seq"} <= found
    found = {target for _, target in imports("softprompt.families.causal", ROOT / "families" / "causal.py")}
    assert "softprompt.loops.generate" in found
