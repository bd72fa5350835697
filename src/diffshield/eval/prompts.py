"""Prompt sets the user supplies: I2P-format CSV files (prompt, evaluation_seed, evaluation_guidance).

The I2P benchmark (Schramowski et al., CVPR 2023) and the UnlearnDiff nudity set are CSV files with a ``prompt``
column and, per row, the seed and guidance scale to generate it with. Other columns are kept as metadata.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from diffshield.core.errors import DiffshieldError

#: the largest seed a row may carry (torch's generators take it, and seed + k stays in range)
MAX_SEED = 2**62


@dataclass
class PromptRow:
    """One prompt with its own seed and guidance (None: use the command's defaults)."""

    prompt: str
    seed: int | None = None
    guidance: float | None = None
    meta: dict = field(default_factory=dict)


def load_prompt_csv(path: str | Path) -> list[PromptRow]:
    """Read an I2P-format CSV. Requires a ``prompt`` column; ``evaluation_seed`` / ``evaluation_guidance``
    (also accepted: ``seed`` / ``guidance``) are optional. Raises DiffshieldError naming the bad line."""
    path = Path(path)
    if not path.is_file():
        raise DiffshieldError(f"prompt CSV '{path}' does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Excel) is skipped
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if "prompt" not in cols:
                raise DiffshieldError(f"'{path}' has no 'prompt' column (columns: {', '.join(cols) or 'none'})")
            seed_col = next((c for c in ("evaluation_seed", "seed", "sd_seed") if c in cols), None)
            guid_col = next((c for c in ("evaluation_guidance", "guidance", "sd_guidance_scale") if c in cols), None)
            rows, empty = [], []
            for raw in reader:
                line = reader.line_num  # the file line the record ends on (blank lines and quoted newlines counted)
                if None in raw:  # more fields than the header: an unquoted comma in the prompt, most likely
                    raise DiffshieldError(f"'{path}' line {line}: {len(cols) + len(raw[None])} fields but the header "
                                          f"has {len(cols)}; quote a prompt that holds a comma (\"a red, striped "
                                          "triangle\")")
                raw = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
                if not raw.get("prompt"):
                    empty.append(line)
                    continue
                try:
                    seed = _whole(raw[seed_col]) if seed_col and raw.get(seed_col) else None
                except (ValueError, OverflowError):
                    raise DiffshieldError(f"'{path}' line {line}: the seed must be a whole number, got "
                                          f"{raw.get(seed_col)!r}") from None
                try:
                    guidance = float(raw[guid_col]) if guid_col and raw.get(guid_col) else None
                    if guidance is not None and not math.isfinite(guidance):
                        raise ValueError
                except (ValueError, OverflowError):
                    raise DiffshieldError(f"'{path}' line {line}: the guidance must be a finite number, got "
                                          f"{raw.get(guid_col)!r}") from None
                if seed is not None and not 0 <= seed <= MAX_SEED:
                    raise DiffshieldError(f"'{path}' line {line}: seed must lie in [0, {MAX_SEED}], got {seed}")
                if guidance is not None and not 0 <= guidance <= 100:
                    raise DiffshieldError(f"'{path}' line {line}: guidance must lie in [0, 100], got {guidance}")
                meta = {k: v for k, v in raw.items() if k not in ("prompt", seed_col, guid_col)}
                rows.append(PromptRow(raw["prompt"], seed, guidance, meta))
    except UnicodeDecodeError:
        raise DiffshieldError(f"'{path}' is not a UTF-8 text CSV file") from None
    except csv.Error as e:
        raise DiffshieldError(f"'{path}' is not a valid CSV file ({e})") from None
    if not rows:
        raise DiffshieldError(f"'{path}' has no prompts")
    if empty:  # row i is prompt index i: say which lines are not rows
        warnings.warn(f"'{path}': {len(empty)} row{'s' if len(empty) > 1 else ''} with an empty prompt skipped "
                      f"(line{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty[:5]))}"
                      f"{' ...' if len(empty) > 5 else ''}); prompt indices count the other rows", stacklevel=2)
    return rows


def _whole(text: str) -> int:
    """A seed written as an integer ("42", also "42.0" or "4.2e1" as spreadsheets write them); "1.9" is refused
    (it was read as 1), and a long integer keeps every digit (float() rounds above 2**53)."""
    try:
        return int(text)
    except ValueError:
        v = float(text)
        if not (math.isfinite(v) and v.is_integer()):
            raise ValueError(text) from None
        return int(v)


def load_prompt_lines(path: str | Path) -> list[PromptRow]:
    """Read a plain prompt file: one prompt per line (UTF-8; blank lines skipped), no seed or guidance of its own."""
    path = Path(path)
    if not path.is_file():
        raise DiffshieldError(f"prompt file '{path}' does not exist or is not a file")
    data = path.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DiffshieldError(f"prompt file '{path}' is not UTF-8 text (binary, or another encoding)") from None
    table = table_header(path, text)
    if table:
        raise DiffshieldError(f"prompt file '{path}' is {table}, not one prompt per line; save it as a "
                              "comma-separated .csv file with a 'prompt' column (I2P's layout)")
    rows = [PromptRow(line.strip()) for line in text.splitlines() if line.strip()]
    if not rows:
        raise DiffshieldError(f"prompt file '{path}' has no prompts")
    warn_hash_lines(path, text)
    return rows


#: column names that, in a first line with a separator, make a one-prompt-per-line file a table (I2P's layout)
TABLE_HEADER_FIELDS = {"prompt", "prompts", "evaluation_seed", "evaluation_guidance", "categories", "seed", "guidance"}


def table_header(path: str | Path, text: str) -> str | None:
    """Why a file meant to hold one prompt per line is a table instead, or None: a .csv or .tsv name, or a first
    line that splits on commas or tabs into fields of which one is ``prompt`` and another a column name of I2P's
    layout (:data:`TABLE_HEADER_FIELDS`). Read as lines, its header and raw rows would become prompts."""
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv"):
        return f"a {suffix[1:].upper()} file"
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    for sep, name in ((",", "comma"), ("\t", "tab")):
        fields = [f.strip().strip('"').lower() for f in first.split(sep)]
        if len(fields) > 1 and "prompt" in fields and len(TABLE_HEADER_FIELDS.intersection(fields)) > 1:
            return f"a {name}-separated table (its first line is the header {first[:60]!r})"
    return None


def warn_hash_lines(path: str | Path, text: str) -> None:
    """Warn when lines of a plain prompt file start with '#': such a file has no comments (prompts, hashtags
    included, may start with '#'), so they are prompts; lists of prompts to keep or select (``--preserve-file``)
    skip them instead."""
    lines = [i for i, line in enumerate(text.splitlines(), 1) if line.strip().startswith("#")]
    if lines:
        n = len(lines)
        warnings.warn(f"'{path}': {n} line{'s' if n > 1 else ''} starting with '#' (first: line {lines[0]}) "
                      f"{'are' if n > 1 else 'is a'} prompt{'s' if n > 1 else ''}: a prompt file has no comment "
                      "lines; delete them if they are notes", UserWarning, stacklevel=2)


def load_prompt_set(path: str | Path) -> list[PromptRow]:
    """Read a prompt set: an I2P-format CSV when the name ends in ``.csv`` (:func:`load_prompt_csv`), otherwise a
    plain file with one prompt per line (:func:`load_prompt_lines`). Row i is prompt index i."""
    if Path(path).suffix.lower() == ".csv":
        return load_prompt_csv(path)
    return load_prompt_lines(path)
