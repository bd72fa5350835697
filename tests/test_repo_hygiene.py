"""The repository speaks to users: no words about how the work on it was organised."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: phrases that only mean something to whoever organised the work: a numbered stop or issue, a closing write-up
PATTERNS = [r"\bstops? [0-9]+\b", r"\bissue [0-9]+\b", r"closing[ _](?:note|stop)"]
SKIP_SUFFIXES = {".json", ".jsonl", ".png", ".jpg", ".jpeg", ".safetensors", ".pt", ".bin", ".ckpt", ".onnx"}


def _text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        names = [n for n in out.split("\0") if n]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file outside hidden folders
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    return [ROOT / n for n in names if Path(n).suffix.lower() not in SKIP_SUFFIXES and (ROOT / n).is_file()]


def test_no_organisation_words():
    pattern = re.compile("|".join(PATTERNS), re.IGNORECASE)
    hits = []
    for path in _text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not hits, "words about how the work was organised:\n" + "\n".join(hits)
