"""docs/cli.md is generated from the argparse definitions and must match them."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGENERATE = ".venv/bin/python scripts/gen_cli_docs.py"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_up_to_date():
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert _generator().render() == committed, f"docs/cli.md is out of date with the CLI; regenerate it: {REGENERATE}"


def test_cli_reference_lists_every_command():
    text = _generator().render()
    for command in ("generate", "erase", "apply-delta", "eval erasure", "audit", "backdoor implant", "scan",
                    "protect", "eval protection", "toyworld train"):
        assert f"`diffshield {command}`" in text, command
