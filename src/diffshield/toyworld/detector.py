"""The toy world's concept detector: a small CNN with one head per attribute.

It plays the part that NudeNet or an ImageNet ResNet-50 plays in the papers: it says which shape, colour, texture
style and background an image shows, with a confidence, and its penultimate features define the toy analogue of
FID (see ``diffshield.eval.frechet``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffshield.toyworld.shapes import BACKGROUNDS, COLOURS, SHAPES, STYLES

HEADS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "style": STYLES, "background": BACKGROUNDS}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class ConceptDetector(nn.Module):
    """CNN: 32 px RGB in [0, 1] -> 128-d features -> logits per head (shape, colour, style, background).

    Args:
        width: channels of the first block (default 32; then 2x and 4x).
        feature_dim: size of the feature vector used for the Fréchet distance (default 128).
    """

    def __init__(self, width: int = 32, feature_dim: int = 128) -> None:
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        self.body = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in HEADS.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, 3, H, W) in [0, 1]; resized to 32 px if needed. Returns (N, feature_dim)."""
        if images.shape[-1] != 32 or images.shape[-2] != 32:
            images = nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
        return self.proj(self.body(images * 2 - 1))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: h(f) for k, h in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per head: (label index, confidence), each of shape (N,) on the CPU; images may live on any device.

        Args:
            images: (N, 3, H, W) float images in [0, 1], N >= 1 (resized to 32 px if needed). NumPy arrays (a
                :class:`~diffshield.toyworld.shapes.ShapesBatch`'s (N, H, W, 3)), channel-last or single images,
                uint8, 0-255 or [-1, 1] values are refused in one line: they gave confident nonsense.
            batch_size: images per forward pass (default 256), a whole number >= 1.

        Runs in eval mode; a detector given in training mode is put back in it afterwards.
        """
        check_detector_images(images)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            from diffshield.core.errors import DiffshieldError

            raise DiffshieldError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
        was_training = self.training
        self.eval()
        try:
            dev = next(self.parameters()).device
            out: dict[str, list] = {k: [] for k in HEADS}
            for i in range(0, len(images), batch_size):
                logits = self(images[i:i + batch_size].to(dev, torch.float32))
                for k, v in logits.items():
                    out[k].append(v.softmax(-1).cpu())
        finally:
            self.train(was_training)
        res = {}
        for k, parts in out.items():
            p = torch.cat(parts)
            conf, idx = p.max(-1)
            res[k] = (idx, conf)
        return res

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``folder``.

        Args:
            dtype: store floating-point tensors in this dtype (default None: as they are, float32). The shipped
                detectors are stored in float16 to halve their size; :meth:`load` casts them back to float32.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
                 for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"_class_name": "ConceptDetector", **self.config}, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> ConceptDetector:
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        model = cls(width=cfg["width"], feature_dim=cfg["feature_dim"])
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()


#: how far outside [0, 1] the detector's input may stray (resampling overshoot) before it is refused
RANGE_TOLERANCE = 0.05


def check_detector_images(images) -> None:
    """One-line DiffshieldError unless ``images`` is a float tensor (N >= 1, 3, H, W) with values in [0, 1] (within
    :data:`RANGE_TOLERANCE`)."""
    from diffshield.core.errors import DiffshieldError

    if not isinstance(images, torch.Tensor):
        hint = (": for a ShapesBatch's (N, H, W, 3) array use torch.from_numpy(batch.images).permute(0, 3, 1, 2)"
                if hasattr(images, "shape") else "")
        raise DiffshieldError(f"the detector takes a torch tensor (N, 3, H, W) in [0, 1], got "
                              f"{type(images).__name__}{hint}")
    if not images.is_floating_point():
        raise DiffshieldError(f"the detector takes float images in [0, 1], got {images.dtype} (uint8: divide by 255)")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise DiffshieldError(f"the detector takes a batch (N >= 1, 3, H, W), got {tuple(images.shape)} (a single "
                              "image: images[None]; channel-last: images.permute(0, 3, 1, 2))")
    lo, hi = float(images.min()), float(images.max())
    if not (-RANGE_TOLERANCE <= lo and hi <= 1 + RANGE_TOLERANCE):  # NaN fails too
        raise DiffshieldError(f"the detector takes images in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                              "(0-255: divide by 255; [-1, 1]: (x + 1) / 2)")


@dataclass
class Detection:
    """Readable detector output for one image."""

    shape: str
    colour: str
    style: str
    background: str
    confidence: dict[str, float]

    def __str__(self) -> str:
        return f"{self.colour} {self.style} {self.shape} on {self.background}"


def describe(detector: ConceptDetector, images: torch.Tensor) -> list[Detection]:
    """Human-readable detections for a batch of images (N, 3, H, W) in [0, 1] (checked as
    :meth:`ConceptDetector.predict` checks them)."""
    pred = detector.predict(images)
    out = []
    for i in range(len(images)):
        names = {k: HEADS[k][int(pred[k][0][i])] for k in HEADS}
        conf = {k: float(pred[k][1][i]) for k in HEADS}
        out.append(Detection(**names, confidence=conf))
    return out


def load_detector(spec: str | Path = "toy:detector") -> ConceptDetector:
    """Load a concept detector (``toy:detector``, ``toy:detector-v1`` or a folder with config.json +
    model.safetensors), checked before it is read."""
    from diffshield.core.errors import DiffshieldError
    from diffshield.core.loading import check_safetensors, resolve_model_path

    path = resolve_model_path(spec)
    weights = path / "model.safetensors"
    if not (path / "config.json").exists() or not weights.exists():
        raise DiffshieldError(f"'{path}' is not a concept-detector folder (needs config.json and model.safetensors)")
    check_safetensors(weights)
    return ConceptDetector.load(path)
