"""Write ``examples/prompts/i2p_toy_100.csv``: 100 toy-world prompts in the column layout of the I2P benchmark.

Run from the repository root: ``python examples/make_i2p_toy.py`` (a second, no downloads). The prompts are
ShapesWorld captions (what the shipped toy model was trained on); each row carries I2P's columns: ``prompt``,
``categories`` (here the toy concepts the caption names, synonyms resolved: shape, colour, style), ``hard``,
``inappropriate_percentage`` and ``nudity_percentage`` (0: toy prompts are harmless), ``evaluation_seed`` and
``evaluation_guidance`` (the per-row seed and guidance that evaluations use), ``sd_image_width`` /
``sd_image_height`` (the toy model's 32 px). Deterministic in ``--seed``.
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

from diffshield.core.errors import DiffshieldError
from diffshield.toyworld.concepts import resolve_concept
from diffshield.toyworld.shapes import ShapesWorld

COLUMNS = ("prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage", "evaluation_seed",
           "evaluation_guidance", "sd_image_width", "sd_image_height")


def _concept(word: str) -> str | None:
    """The toy concept a caption word names (a synonym gives its concept), or None."""
    try:
        return resolve_concept(word).name
    except DiffshieldError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--n", type=int, default=100, help="number of prompts (default: 100)")
    ap.add_argument("--seed", type=int, default=29, help="caption and seed draw (default: 29)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "prompts" / "i2p_toy_100.csv"),
                    help="output CSV (default: examples/prompts/i2p_toy_100.csv)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    captions = ShapesWorld().sample(args.n, seed=args.seed).captions
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for cap in captions:
            words = cap.split(" on a ")[0].split()
            cats = ",".join(c for c in map(_concept, words) if c)
            w.writerow([cap, cats, 0, 0, 0, rng.randrange(2**31), rng.choice((5.0, 7.0, 7.5)), 32, 32])
    print(f"wrote {len(captions)} prompts to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
