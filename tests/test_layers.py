"""Lower layers never import higher ones: core/ imports only core/; pillars, eval/ and toyworld/ never import cli/."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "diffshield"
HIGHER_THAN_CORE = ("toyworld", "erase", "redteam", "backdoor", "protect", "eval", "cli")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):  # function-level (lazy) imports count too
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for f in sorted((SRC / folder).rglob("*.py")):
        for mod in imported_modules(f):
            parts = mod.split(".")
            if parts[0] == "diffshield" and len(parts) > 1 and parts[1] in forbidden:
                bad.append(f"{f.relative_to(SRC)} imports {mod}")
    return bad


def test_core_imports_only_core():
    assert offenders("core", HIGHER_THAN_CORE) == []


def test_nothing_below_the_cli_imports_it():
    for folder in ("core", "erase", "redteam", "backdoor", "protect", "eval", "toyworld"):
        assert offenders(folder, ("cli",)) == [], folder
