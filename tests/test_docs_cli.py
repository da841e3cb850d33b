"""docs/cli.md cannot drift from the command line: the real parser (softprompt/cli.py's, walked in
process, no subprocess per option) decides what the page must say.

- every command and store subcommand has its section (`### softprompt NAME`), and every long option
  of it is a row of that section's table (or of "Common options"), with the default it really has;
  no row names an option the command lacks;
- every method the pages name (`--method X`, `method: X`, `method="X"`, `--methods a,b`) parses;
- `softprompt --help` lists each command with a whole short sentence (its description's first
  paragraph, ending in '.'), never a line cut from a longer one;
- the `--report-to` trackers are documented where the flag is.
"""

import argparse
import re
from pathlib import Path

import pytest

from softprompt import cli

ROOT = Path(__file__).resolve().parents[1]
CLI_MD = ROOT / "docs" / "cli.md"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMON = "Common options"
OPTION = re.compile(r"(?<![\w-])(--?[a-z][\w.-]*)")


def commands():
    """(name, parser) for every command and store subcommand, as a user reaches them."""
    for action in cli.build_parser()._subparsers._group_actions:
        for name, sub in action.choices.items():
            kind = cli.COMMANDS[name]
            if isinstance(kind, str):  # built from a config when it runs (train, compare, serve, eval, generate)
                yield name, cli.config_parser(name)
            elif isinstance(kind, dict):
                yield name, sub
                for sname, ssub in sub._subparsers._group_actions[0].choices.items():
                    yield f"{name} {sname}", ssub
            else:
                yield name, sub


COMMANDS = dict(commands())


def sections(text: str) -> dict[str, str]:
    """Heading -> its text up to the next heading (a `#` line inside a code block is no heading)."""
    out, head, fenced = {}, None, False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#{1,6} ", line):
            head = line.lstrip("#").strip()
            out[head] = ""
        elif head is not None:
            out[head] += line + "\n"
    return out


def rows(section: str) -> list[tuple[list[str], str]]:
    """(options named in the first cell, the default cell) of each option row of a section's table."""
    out = []
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) >= 3 and cells[0].startswith("`-"):
            out.append((OPTION.findall(cells[0]), cells[1]))
    return out


SECTIONS = sections(CLI_MD.read_text())


def negation(action, option: str) -> bool:
    """`--no-X` of an on/off option: documented with `--X` (the page says so once)."""
    return isinstance(action, argparse.BooleanOptionalAction) and option.startswith("--no-") and \
        option != action.option_strings[0]


def actions(parser) -> dict[str, argparse.Action]:
    return {o: a for a in parser._actions for o in a.option_strings}


def shown(default) -> str:
    """A default as the page writes it: `on`/`off` for an on/off option, — for none, else the value."""
    if default is True or default is False:
        return "on" if default else "off"
    if default in (None, (), [], "") or default is argparse.SUPPRESS:
        return "—"
    return str(default)


def same_default(cell: str, default) -> bool:
    cell, want = cell.strip("`").replace("\\|", "|"), shown(default)
    try:
        return float(cell) == float(want)  # 5e-5 and 5e-05
    except ValueError:
        return cell == want


def common_rows():
    return {o: d for opts, d in rows(SECTIONS[COMMON]) for o in opts}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_option_is_a_row_of_its_commands_section(name):
    head = f"softprompt {name}"
    assert head in SECTIONS, f"docs/cli.md has no section '### {head}'"
    have = actions(COMMANDS[name])
    documented = {o: d for opts, d in rows(SECTIONS[head]) for o in opts}
    common = common_rows()
    missing = [o for o, a in have.items() if o.startswith("--") and o != "--help" and o not in documented
               and o not in common and not negation(a, o)]
    assert not missing, f"docs/cli.md, section {head}: no row for {', '.join(missing)}"
    unknown = [o for o in documented if o not in have]
    assert not unknown, f"docs/cli.md, section {head}: {', '.join(unknown)} is no option of `{head}`"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_row_shows_the_default_the_command_has(name):
    have = actions(COMMANDS[name])
    bad = []
    for options, cell in rows(SECTIONS[f"softprompt {name}"]):
        targets = {id(have[o]) for o in options if o in have}
        assert len(targets) == 1, f"softprompt {name}: one row, one option (and its other names): {options}"
        action = have[options[0]]
        if not same_default(cell, action.default):
            bad.append(f"{options[0]}: the page says {cell}, the command {shown(action.default)}")
    assert not bad, f"docs/cli.md, section softprompt {name}: " + "; ".join(bad)


def test_common_options_are_what_every_command_taking_them_has():
    common = common_rows()
    assert {"--config", "--device", "--dtype", "--quantize", "--threads"} <= set(common)
    for name, parser in COMMANDS.items():
        have = actions(parser)
        for option, cell in common.items():
            if option in have and option != "--help":
                assert same_default(cell, have[option].default), (name, option, cell, have[option].default)


def _code(text: str) -> str:
    """The code of a page (fenced blocks and `inline` spans), where `method: X` is a value, not prose."""
    fenced = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
    return "\n".join(fenced + re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)))


def _method_mentions():
    """(page, command, value, plural) for each method a page names; command is the `softprompt X` the
    mention belongs to (the one earlier on its line; backslash-continued lines are one), else None."""
    flags = re.compile(r"--methods?[ =]([\w,|\\-]+)")
    values = re.compile(r"\bmethod\"?:\s*\"?([\w-]+)|\bmethod=\"([\w-]+)\"")
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")
        found = [(line, m) for line in text.splitlines() for m in flags.finditer(line)]
        found += [(line, m) for line in _code(text).splitlines() for m in values.finditer(line)]
        for line, m in found:
            before = re.findall(r"softprompt ([a-z][\w-]*)", line[:m.start()])
            value = next(g for g in m.groups() if g)
            plural = m.group(0).startswith("--methods")
            for v in re.split(r"\\?\|", value):
                yield page.name, before[-1] if before else None, v, plural


def _accepts(command: str | None, value: str, plural: bool) -> bool:
    try:
        if plural:
            cli.parse_config_command("compare", ["--data", "d", "--methods", value])
        elif command in ("init", "demo"):
            cli.build_parser().parse_args([command, *(["OUT"] if command == "init" else []), "--method", value])
        else:  # train (or prose about it): the method of a generation run or of a classifier
            for extra in ([], ["--task", "classify", "--labels", "a,b"]):
                try:
                    cli.parse_config_command("train", ["d", "o", "--method", value, *extra])
                    return True
                except ValueError:
                    continue
            return False
    except (SystemExit, ValueError):
        return False
    return True


def test_every_method_the_pages_name_is_accepted(capsys):
    mentions = list(_method_mentions())
    assert len(mentions) > 10 and any(v == "head_only" for _, _, v, _ in mentions)
    bad = [f"{page}: {'--methods' if plural else '--method'} {v} ({cmd or 'train'})"
           for page, cmd, v, plural in mentions if not _accepts(cmd, v, plural)]
    capsys.readouterr()
    assert not bad, "methods the CLI refuses: " + "; ".join(bad)


def test_head_only_needs_the_classify_task_in_one_line(capsys):
    assert cli.parse_config_command("train", ["d", "o", "--method", "head_only", "--task", "classify",
                                              "--labels", "a,b"]).method == "head_only"
    assert cli.main(["train", "d.jsonl", "o", "--method", "head_only"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --task classify" in err[0]


def _headlines():
    """(command, its line in the list of `softprompt --help` / `softprompt store --help`, its description)."""
    top = cli.build_parser()
    groups = [("", top._subparsers._group_actions[0])]
    store = top._subparsers._group_actions[0].choices["store"]
    groups.append(("store ", store._subparsers._group_actions[0]))
    for prefix, group in groups:
        for choice in group._choices_actions:
            name = prefix + choice.dest
            parser = COMMANDS[name]
            yield name, choice.help.replace("%%", "%"), parser.description.replace("%%", "%")


@pytest.mark.parametrize("name,line,description", list(_headlines()))
def test_top_level_help_gives_each_command_a_whole_short_sentence(name, line, description):
    assert line.endswith(".") and "\n" not in line and len(line) <= 100, (name, line)
    first = " ".join(description.strip().split("\n\n")[0].split())
    assert line == first, f"{name}: the help line is not its description's whole first paragraph: {line!r}"


def test_report_to_trackers_are_documented():
    from softprompt.loops.tracking import TRACKERS, parse_report_to

    train = SECTIONS["softprompt train"]
    row = next(line for line in train.splitlines() if line.startswith("| `--report-to`"))
    guide = (ROOT / "docs" / "training.md").read_text()
    for name in TRACKERS:
        assert name in row and f"`{name}`" in guide, name
    for page in PAGES:  # every --report-to value a page shows is one the flag takes
        for value in re.findall(r"--report-to[ =]([\w,]+)", page.read_text()):
            assert parse_report_to(value), (page.name, value)
