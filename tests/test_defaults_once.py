"""Every default has one home: the dataclass field defaults of TrainConfig and DataConfig
(softprompt/loops/config.py), the methods' configs (softprompt/methods/config.py), the run's parts
(softprompt/runs/config.py) and the tables in softprompt/core/defaults.py. No function signature or
other dataclass in softprompt/ repeats one of those values under the same name, and nothing tests a
method's name to pick a default (`== "prefix_tuning"`)."""

import ast
from dataclasses import MISSING, fields
from pathlib import Path

from softprompt.loops.config import DataConfig, TrainConfig
from softprompt.methods.config import CONFIGS
from softprompt.runs.config import ClassifyConfig, ModelConfig, OutputConfig

ROOT = Path(__file__).resolve().parents[1] / "softprompt"
HOMES = {"loops/config.py", "methods/config.py", "runs/config.py", "core/defaults.py"}
# Repeats outside the files this rule was written with, each with its reason (the list only shrinks):
ALLOWED: set[str] = set()


def home_defaults() -> dict[str, set]:
    out: dict[str, set] = {}
    for cls in (TrainConfig, DataConfig, ModelConfig, OutputConfig, ClassifyConfig, *CONFIGS.values()):
        for f in fields(cls):
            if f.default is not MISSING and f.default not in (None, False, True, 0, 0.0, (), ""):
                out.setdefault(f.name, set()).add(f.default)
    return out


def literal_defaults(tree):
    """(function or class name, parameter or field name, literal value) for every literal default."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            pos = a.posonlyargs + a.args
            pairs = list(zip(pos[len(pos) - len(a.defaults):], a.defaults)) + \
                [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, d in pairs:
                if isinstance(d, ast.Constant):
                    yield node.name, arg.arg, d.value
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) \
                        and isinstance(item.value, ast.Constant):
                    yield node.name, item.target.id, item.value.value


def test_no_default_is_written_twice():
    homes, bad = home_defaults(), []
    assert homes["num_virtual_tokens"] == {20} and homes["projection_dim"] == {512} and homes["steps"] == {200}
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in HOMES:
            continue
        for where, name, value in literal_defaults(ast.parse(path.read_text())):
            if name in homes and value in homes[name] and type(value) is not bool \
                    and f"{rel}:{where}: {name}" not in ALLOWED:
                bad.append(f"{rel}:{where}: {name}={value!r} (its home: the config's field default)")
    assert not bad, "\n".join(bad)


def test_no_default_is_picked_by_a_method_name():
    bad = []
    for rel in ("cli.py", "core/defaults.py", "runs/train.py", "runs/config.py", "runs/api.py", "runs/compare.py",
                "runs/classify.py", "loops/train.py"):
        for i, line in enumerate((ROOT / rel).read_text().splitlines(), 1):
            if '== "prefix_tuning"' in line or '== "prompt_tuning"' in line or '== "p_tuning"' in line:
                bad.append(f"{rel}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


def test_no_function_copies_its_arguments_with_locals():
    bad = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if "dict(locals())" in p.read_text()]
    assert not bad, bad
