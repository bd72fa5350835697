"""Assemble README's per-issue benchmark sections from notes/ (the lead runs it before committing)."""
from pathlib import Path

root = Path(__file__).resolve().parent.parent
readme = (root / "README.md").read_text()
ANCHOR = "ESD on `toy:t2i`: 0.74 s per iteration (ESD-x), 0.77 s (ESD-u), 2 threads.\n"


def section_a(name: str) -> str:
    text = (root / "notes" / name).read_text()
    body = text.split("## (a)", 1)[1].split("\n", 1)[1]
    return body.split("\n## (b)", 1)[0].strip() + "\n"


parts = [(root / "notes" / "issue3_readme.md").read_text().strip() + "\n"]
for name in ("issue4.md", "issue5.md", "issue6.md"):
    path = root / "notes" / name
    if path.is_file() and "## (a)" in path.read_text():
        parts.append(section_a(name))
cut = readme.index(ANCHOR) + len(ANCHOR)
end = readme.index("## Layout")
readme = readme[:cut] + "\n" + "\n".join(parts) + "\n" + readme[end:]
(root / "README.md").write_text(readme.replace("(issue 3, partial)", "(issue 3)"))
print("README assembled:", len(readme), "chars")
