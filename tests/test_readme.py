"""The README is short and every command in it runs as written on a fresh clone.

The test runs each ``diffshield`` command of the README's bash blocks (in a temporary folder that sees the
repository's ``examples/`` and ``src/``), with flags appended that shrink the work (the last value of a flag wins),
and executes its Python blocks.
"""

import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_BYTES = 12 * 1024

#: flags appended to each README command so that it runs in seconds (same code paths, fewer images and steps)
TINY = {
    "generate": ["--n", "1", "--steps", "2", "--threads", "1"],
    "erase": ["--threads", "1"],
    "eval erasure": ["--seeds-per-prompt", "1", "--n-neutral", "2", "--steps", "2", "--threads", "1"],
    "audit": ["--n", "2", "--steps", "2", "--set", "unlearndiff.rounds=1", "--set", "unlearndiff.iterations=1",
              "--set", "p4d.steps=1", "--set", "p4d.eval_every=1", "--set", "ring-a-bell-genetic.population=4",
              "--set", "ring-a-bell-genetic.generations=1"],
    "backdoor sample": ["--n", "1", "--steps", "2"],
    "scan": ["--evidence-n", "2", "--evidence-steps", "2"],  # the TERD preset is shrunk below
    "protect": ["--steps", "2"],
    "eval protection": [],
}
#: set-up lines of the README that the suite does not run itself
NOT_RUN = ("make ", "source ")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def _commands() -> list[list[str]]:
    out = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and not line.startswith(NOT_RUN):
                out.append(words)
    return out


def _tiny(words: list[str]) -> list[str]:
    assert words[0] == "diffshield", f"README command the test does not know how to run: {shlex.join(words)}"
    argv = words[1:]
    for key in sorted(TINY, key=len, reverse=True):
        if argv[:len(key.split())] == key.split():
            if key == "scan" and "--out" not in argv:  # the evidence flags need --out (refused without it)
                return argv
            return argv + TINY[key]
    raise AssertionError(f"README command without a tiny-size rule in tests/test_readme.py: {shlex.join(words)}")


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.encode()) <= MAX_BYTES, f"README.md is {len(text.encode())} bytes, over {MAX_BYTES}"
    first = _blocks("bash")[0].split()
    assert text.index("```bash") < text.index("\n## "), "the set-up commands come first"
    assert first[:2] == ["make", "demo"] and "make" in first[2:] and "test" in first[2:]


def test_readme_links_exist():
    text = README.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"


def test_readme_commands_run(tmp_path, monkeypatch):
    from diffshield.backdoor import terd
    from diffshield.cli.main import main

    for name in ("examples", "src"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    for preset in ("fast", "cpu"):
        monkeypatch.setitem(terd.PRESETS, preset, {"stage1_iters": 1, "stage2_iters": 1, "batch_size": 2,
                                                   "ddim_steps": 2})
    threads = torch.get_num_threads()
    commands = _commands()
    assert len(commands) >= 8, "the README shows one example per pillar"
    try:
        for words in commands:
            argv = _tiny(words)
            assert main(argv) == 0, f"README command failed: {shlex.join(words)}"
        namespace: dict = {}
        for block in _blocks("python"):
            exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("page", ["erase", "redteam", "backdoor", "protect", "toyworld", "cli", "benchmarks"])
def test_docs_pages_exist(page):
    assert (ROOT / "docs" / f"{page}.md").is_file()


def _anchors(page: Path) -> set[str]:
    """The anchors a Markdown page offers: its headings as GitHub slugs them (numbered when repeated), and
    explicit ``<a id=...>`` / ``<a name=...>``."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    out, seen = set(), {}
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, flags=re.M):
        plain = re.sub(r"`|\*|\[|\]\([^)]*\)", "", m.group(1)).strip().lower()
        slug = re.sub(r"[^\w\- ]", "", plain).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out | set(re.findall(r"<a (?:name|id)=['\"]([^'\"]+)", text))


def test_docs_links_and_anchors_exist():
    """Every relative link of README.md, CHANGELOG.md and docs/*.md names a file that exists, and every #anchor into
    a Markdown page names one of its headings."""
    bad = []
    for page in [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            linked = page.parent / path if path else page
            if not linked.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                bad.append(f"{page.name}: {target} (no such heading)")
    assert not bad, "broken links: " + "; ".join(bad)
