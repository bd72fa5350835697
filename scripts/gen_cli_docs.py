"""Write docs/cli.md, the reference of every ``diffshield`` command and flag, from the argparse definitions.

Run from anywhere: ``python scripts/gen_cli_docs.py`` rewrites ``docs/cli.md``; ``--check`` only compares and exits
1 when the file is out of date. The text depends only on the parser (no terminal width, no absolute paths), so
``tests/test_cli_docs.py`` can assert that the committed file equals a fresh rendering.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "cli.md"
COMMAND = "python scripts/gen_cli_docs.py"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _relative(text: str) -> str:
    """Paths of this checkout or of the installed package (a default such as the package's weights folder) are
    written relative to the repository, so that the text is the same on every machine."""
    import diffshield

    package = str(Path(diffshield.__file__).resolve().parent)
    return text.replace(package, "src/diffshield").replace(str(ROOT) + "/", "").replace(str(ROOT), ".")


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    formatter = argparse.HelpFormatter(parser.prog)
    return _relative(formatter._expand_help(action))


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "flag"
    if action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        value = "{" + ", ".join(str(c) for c in action.choices) + "}"
    else:
        value = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    if action.nargs in ("*", "+"):
        value += " ..."
    elif isinstance(action.nargs, int) and action.nargs > 1:
        value = " ".join([value] * action.nargs)
    if isinstance(action, argparse._AppendAction):
        value += " (repeatable)"
    return value


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
        return ""
    if isinstance(action.default, (list, tuple)):
        return " ".join(str(d) for d in action.default)
    return _relative(str(action.default))


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                out.append((choice.dest, choice.help or "", action.choices[choice.dest]))
    return out


def _section(parser: argparse.ArgumentParser, name: str, level: int) -> list[str]:
    lines = [f"{'#' * level} `{name}`", ""]
    if parser.description:
        lines += [_relative(" ".join(parser.description.split())), ""]
    subs = _subcommands(parser)
    rows = [a for a in parser._actions
            if not isinstance(a, (argparse._SubParsersAction, argparse._HelpAction)) and a.help != argparse.SUPPRESS]
    positionals = [a for a in rows if not a.option_strings]
    usage = name + "".join(f" {_value(a)}" for a in positionals) + (" COMMAND" if subs else "")
    usage += " [options]" if any(a.option_strings for a in rows) else ""
    lines += [f"Usage: `{usage}`", ""]
    if subs:
        lines += ["| command | what it does |", "|---|---|"]
        lines += [f"| `{name} {sub}` | {_cell(help_)} |" for sub, help_, _ in subs]
        lines.append("")
    if rows:
        lines += ["| argument | value | default | description |", "|---|---|---|---|"]
        for a in rows:
            flag = ", ".join(f"`{s}`" for s in a.option_strings) or f"`{a.metavar or a.dest}`"
            default = _default(a)
            lines.append(f"| {flag} | {_cell(_value(a))} | {_cell(default) if default else ''} | "
                         f"{_cell(_help(parser, a))} |")
        lines.append("")
    for sub, _, subparser in subs:
        lines += _section(subparser, f"{name} {sub}", min(level + 1, 4))
    return lines


def render() -> str:
    """The full text of docs/cli.md."""
    from diffshield.cli.main import build_parser

    parser = build_parser()
    head = [
        "# Command-line reference",
        "",
        f"<!-- Generated from the argparse definitions by `{COMMAND}`; do not edit by hand. -->",
        "",
        "Every command prints its help with `--help`. Errors are one line (`diffshield: error: ...`): exit status 2 "
        "for bad input, 1 for the machine's (a full disk, an unreadable file system, no memory left); Ctrl-C stops "
        "with 130 and SIGTERM with 143, one line each, leaving no half-written output ([outputs.md](outputs.md)).",
        "A model argument takes a diffusers folder or a shipped toy name (`toy:t2i`, `toy:ddpm`, `toy:inpaint`, "
        "`toy:ddpm-box-corner`).",
        "",
    ]
    body = _section(parser, "diffshield", 2)
    return "\n".join(head + body).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write docs/cli.md from the diffshield argparse definitions.")
    ap.add_argument("--check", action="store_true", help="only compare with the committed file; exit 1 if it differs")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        same = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT.relative_to(ROOT)} is {'up to date' if same else f'out of date: run {COMMAND}'}")
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
