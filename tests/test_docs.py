"""The README and docs stay true: the site builds strictly (links and anchors), the README stays
short, every `softprompt ...` command line they show names a real command and real options, and
the README's Python example runs (on a tiny model standing in for the embedded one)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from softprompt.cli import COMMANDS, build_parser, config_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_site_builds_strictly(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "index.html").exists()


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) < 200


def _blocks(text: str, lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _command_lines():
    """(page, line) for each `softprompt ...` line in a bash block or a table cell of every page."""
    for page in PAGES:
        text = page.read_text()
        lines = [ln for block in _blocks(text, "bash") for ln in block.splitlines()]
        lines += re.findall(r"`(softprompt [^`]+)`", text)
        for line in lines:
            line = line.split("#", 1)[0].strip()
            if line.startswith("softprompt "):
                yield page.name, line


def _options(parser) -> dict[str, set[str]]:
    """Command name ("train", "store add") -> its option strings."""
    out = {}
    for action in parser._subparsers._group_actions:
        for name, sub in action.choices.items():
            if isinstance(COMMANDS.get(name), str):  # built from a config (train, compare, serve, eval, generate)
                sub = config_parser(name)
            if name == "store":
                for sname, ssub in sub._subparsers._group_actions[0].choices.items():
                    out[f"store {sname}"] = {o for a in ssub._actions for o in a.option_strings}
            out[name] = {o for a in sub._actions for o in a.option_strings}
    return out


def test_every_command_line_shown_names_real_commands_and_options():
    options = _options(build_parser())
    seen, bad = 0, []
    for page, line in _command_lines():
        words = line.split()
        if words[1].startswith("-") or words[1].isupper():
            continue  # `softprompt --help`, `softprompt COMMAND --help`
        if words[1] == "store" and len(words) > 2 and not words[2].isupper():  # `store SUBCOMMAND`: the group
            names = [f"store {n}" for n in re.split(r"/|\\\|", words[2])]
        else:
            names = re.split(r"/|\\\|", words[1])  # `train/generate/eval --base DIR`: each of them
        for name in names:
            if name not in options:
                bad.append(f"{page}: unknown command {name!r} in {line!r}")
                continue
            seen += 1
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line):
                if flag not in options[name] and flag != "--help":
                    bad.append(f"{page}: {name} has no option {flag} ({line[:80]!r})")
    assert seen > 20 and not bad, "\n".join(bad)


def test_the_readme_python_example_runs(embedded_stand_in, tmp_path, monkeypatch):
    """The README's Python API block, as written, on a tiny model and a small data file."""
    import json

    from tiny_tokenizer import WORDS

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"input": f"{WORDS[i]} {WORDS[i + 1]}",
                                                             "output": WORDS[i + 2]}) + "\n" for i in range(0, 20, 2)))
    code = next(b for b in _blocks((ROOT / "README.md").read_text(), "python") if "import softprompt as sp" in b)
    code = code.replace("steps=200", "steps=2, batch_size=4, progress=False").replace("name[Aromi] ||", WORDS[0])
    printed = []
    exec(compile(code, "README.md", "exec"), {"print": printed.append})
    assert (tmp_path / "runs" / "mytask-py").exists() and isinstance(printed[0], list)


@pytest.mark.parametrize("page", [p.name for p in PAGES])
def test_no_page_links_to_a_missing_file(page):
    """Links to repository files (outside docs/, which the site does not check) point at real files."""
    path = next(p for p in PAGES if p.name == page)
    for target in re.findall(r"\]\(([^)#\s]+)", path.read_text()):
        if not target.startswith(("http://", "https://", "mailto:")):
            assert (path.parent / target).exists(), f"{page} links to {target}, which does not exist"
