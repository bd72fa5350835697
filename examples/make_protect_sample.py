"""Write the sample inputs of ``diffshield protect``: a photo-like toy scene and the mask of its main object.

Run from the repository root: ``python examples/make_protect_sample.py`` (a second, no downloads). It writes
``examples/protect/scene.png`` (128x128 RGB: a pastel background with faint stripes and 1-3 ShapesWorld shapes) and
``examples/protect/mask.png`` (white = the region to protect: the front object's silhouette dilated by 4 px), both
rendered by :mod:`diffshield.protect.scenes`, deterministic in ``--seed``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from diffshield.protect.scenes import make_scenes, protected_masks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size", type=int, default=128, help="side in pixels (default: 128)")
    ap.add_argument("--seed", type=int, default=4, help="scene seed (default: 4)")
    ap.add_argument("--margin", type=int, default=4, help="mask dilation in pixels (default: 4)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "protect"),
                    help="output folder (default: examples/protect)")
    args = ap.parse_args(argv)
    scenes = make_scenes(1, size=args.size, seed=args.seed)
    mask = protected_masks(scenes.object_masks, margin=args.margin)[0, 0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rgb = (scenes.images[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(out / "scene.png")
    Image.fromarray((mask.numpy() * 255).astype(np.uint8)).save(out / "mask.png")
    print(f"wrote {out / 'scene.png'} and {out / 'mask.png'} ({mask.mean().item():.1%} of the image protected)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
