"""A small word-level CLIP BPE tokenizer, built offline from a word list.

The files are the same as a real CLIP tokenizer's (``vocab.json`` + ``merges.txt``), so that
``transformers.CLIPTokenizer.from_pretrained(folder)`` loads them: every listed word becomes a single token, any
other text falls back to single characters. Used for the toy world and for the tiny test fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """The 256 printable characters that byte-level BPE uses to stand for bytes (same table as GPT-2/CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges to one word the way CLIP does (lowest rank first)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def build_tokenizer_files(words: list[str] | tuple[str, ...], folder: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer configs for a word-level CLIP tokenizer into ``folder``.

    Args:
        words: lower-case words that must each become one token.
        folder: output folder (created).
        model_max_length: padded sequence length (default 77, as CLIP).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        # Merge whatever pieces the current merges leave, left to right, until the word is one token.
        for _ in range(len(w) + 1):
            parts = _bpe(w, ranks)
            if len(parts) == 1:
                break
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
        assert len(_bpe(w, ranks)) == 1, w
    vocab_list = [BOS, EOS]
    alphabet = _byte_alphabet()
    vocab_list += alphabet + [c + "</w>" for c in alphabet]
    vocab_list += [a + b for a, b in merges]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return folder
