"""Shell completion for `softprompt`, generated from the command line's own parsers (so it cannot
drift from them): commands, `store` subcommands, every option, and the values of options with a
fixed set (`--method`, `--schedule`, ...); file names elsewhere.

    python -m softprompt.completion bash > ~/.local/share/bash-completion/completions/softprompt
    python -m softprompt.completion zsh  > ~/.zfunc/_softprompt      # zsh, through bashcompinit
    eval "$(python -m softprompt.completion bash)"                   # this shell only
"""

from __future__ import annotations

import argparse
import sys


def _options(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, list[str]]]:
    """(option strings, option -> its fixed values) of one parser."""
    flags, choices = [], {}
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--"):
                flags.append(flag)
                if action.choices and not isinstance(action, argparse._SubParsersAction):
                    choices[flag] = [str(c) for c in action.choices]
    return flags, choices


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def tree() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """{"": top-level words, "store": its subcommands, "store add": its options, ...} and every
    option's fixed values."""
    from softprompt import cli

    root = cli.build_parser()
    words: dict[str, list[str]] = {}
    choices: dict[str, list[str]] = {}
    top = _subcommands(root)
    words[""] = sorted(top) + _options(root)[0]
    for name, parser in top.items():
        subs = _subcommands(parser)
        if subs:
            words[name] = sorted(subs)
            items = [(f"{name} {s}", p) for s, p in subs.items()]
        else:  # train and compare build their parser when they run: ask for it here
            items = [(name, cli.config_parser(name) if isinstance(cli.COMMANDS.get(name), str) else parser)]
        for key, p in items:
            flags, fixed = _options(p)
            words[key] = flags
            choices.update(fixed)
    return words, choices


def bash() -> str:
    words, choices = tree()
    cases = "\n".join(f'        "{key}") opts="{" ".join(ws)}" ;;' for key, ws in words.items())
    values = "\n".join(f'        {flag}) COMPREPLY=( $(compgen -W "{" ".join(vs)}" -- "$cur") ); return ;;'
                       for flag, vs in sorted(choices.items()))
    groups = " ".join(k for k in words if k and " " not in k and any(w.startswith(k + " ") for w in words))
    return f'''# softprompt shell completion (python -m softprompt.completion bash)
_softprompt() {{
    local cur prev key="" i w opts
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    case "$prev" in
{values}
    esac
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        [[ "$w" == -* ]] && continue
        if [[ -z "$key" ]]; then key="$w"
        elif [[ " {groups} " == *" $key "* && "$key" != *" "* ]]; then key="$key $w"
        fi
    done
    case "$key" in
{cases}
        *) opts="" ;;
    esac
    if [[ "$cur" == -* || ( -n "$opts" && "$opts" != --* ) ]]; then
        COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
    fi
    [[ ${{#COMPREPLY[@]}} -eq 0 ]] && COMPREPLY=( $(compgen -f -- "$cur") )
}}
complete -o filenames -F _softprompt softprompt
'''


def zsh() -> str:
    return "#compdef softprompt\nautoload -U +X bashcompinit && bashcompinit\n" + bash()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    shells = {"bash": bash, "zsh": zsh}
    if len(args) != 1 or args[0] not in shells:
        print("usage: python -m softprompt.completion {bash,zsh}", file=sys.stderr)
        return 2
    sys.stdout.write(shells[args[0]]())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
