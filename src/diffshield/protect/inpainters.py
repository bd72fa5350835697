"""Inpainting models behind one interface: ``f(image, mask) -> image``.

``image`` is (N, 3, H, W) in [0, 1], ``mask`` is (N, 1, H, W) with 1 = hole; the result is (N, 3, H, W) in [0, 1],
equal to ``image`` outside the hole, and differentiable in ``image`` (which is what image protection needs). Any
size works: :class:`Inpainter` pads H and W to a multiple of 8 (reflect) and crops back.

Shipped and loadable inpainters:

- ``toy:inpaint`` (alias ``toy``): :class:`FFCInpainterNet`, a small LaMa-style generator (Suvorov et al.,
  "Resolution-robust Large Mask Inpainting with Fourier Convolutions", WACV 2022): input ``cat(x * (1 - m), m)``,
  a strided-conv encoder, Fast Fourier Convolution residual blocks, a transposed-conv decoder, sigmoid output;
  trained on the toy scenes of :mod:`diffshield.protect.scenes` (``python -m diffshield.protect.train_inpainter``).
  Weights: safetensors + config.json.
- a TorchScript ``big-lama.pt`` supplied by the user (:class:`TorchScriptInpainter`), called as ``model(image,
  mask)`` like LaMa's exported model.
- anything else: subclass :class:`Inpainter` and implement ``fill``, or wrap a function with :class:`FnInpainter`.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import check_safetensors
from diffshield.toyworld.names import TOY_ROOT

TOY_INPAINTERS: dict[str, str] = {"toy": "inpaint", "toy:inpaint": "inpaint"}


class Inpainter(nn.Module):
    """Base class: ``f(image, mask)`` pads to a multiple of ``multiple`` (default 8), calls :meth:`fill`, crops and
    composites ``m * fill + (1 - m) * image``. Subclasses implement ``fill(image, mask) -> image`` on padded input.

    Inputs on another device than the inpainter's parameters are moved there for :meth:`fill` and the result comes
    back on the input's device (differentiably); move the inputs yourself to avoid the copies.
    """

    multiple: int = 8

    def fill(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise DiffshieldError(f"inpainter expects images of shape (N, 3, H, W), got {tuple(image.shape)}")
        if mask.shape[0] != image.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != image.shape[2:]:
            raise DiffshieldError(
                f"mask of shape {tuple(mask.shape)} does not match image {tuple(image.shape)}; "
                "give one (N, 1, H, W) mask per image"
            )
        h, w = image.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        x, m = image, mask
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(image, (0, pw, 0, ph), mode=mode)
            m = F.pad(mask, (0, pw, 0, ph), mode=mode)
        p = next(self.parameters(), None)
        if p is not None and p.device != x.device:
            out = self.fill(x.to(p.device, p.dtype), m.to(p.device, p.dtype)).to(image.device, image.dtype)
        else:
            out = self.fill(x, m)
        out = out[..., :h, :w]
        return mask * out + (1 - mask) * image


def check_fill(out, image: torch.Tensor, name: str, tol: float = 0.05, broadcast: bool = False) -> torch.Tensor:
    """``out`` if it is a float tensor of ``image``'s shape with values in [0, 1] (beyond ``tol``, default 0.05),
    else a one-line DiffshieldError naming ``name``: a 0-255 or [-1, 1] fill would paint wrong colours.
    ``broadcast`` (default False) also takes one fill per image whose other sizes are the image's or 1 (a
    (N, 3, 1, 1) colour, a (N, 1, H, W) grey fill), never a fill whose batch is not the images' (one image's fill
    would be broadcast to the whole batch)."""
    if not isinstance(out, torch.Tensor):
        raise DiffshieldError(f"{name} returned {type(out).__name__}, not one image tensor; it must map "
                              "(image, mask) to an (N, 3, H, W) image")
    fits = (out.dim() == image.dim() and out.shape[0] == image.shape[0]
            and all(o in (i, 1) for o, i in zip(out.shape[1:], image.shape[1:])))
    if out.shape != image.shape and not (broadcast and fits):
        raise DiffshieldError(f"{name} returned shape {tuple(out.shape)} for images of shape "
                              f"{tuple(image.shape)}; it must return an image of the input's shape")
    if not out.is_floating_point():
        raise DiffshieldError(f"{name} returned {out.dtype} values; it must return floats in [0, 1]")
    lo, hi = float(out.detach().min()), float(out.detach().max())
    if not (-tol <= lo and hi <= 1 + tol):  # NaN fails too
        raise DiffshieldError(f"{name} returned values in [{lo:.4g}, {hi:.4g}], not [0, 1] (a 0-255 "
                              "export?); wrap it so that it returns images in [0, 1]")
    return out


class FnInpainter(Inpainter):
    """Wrap any differentiable ``fn(image, mask) -> image`` (for example a diffusers inpainting loop).

    Args:
        fn: called on the padded (N, 3, H, W) images in [0, 1] and (N, 1, H, W) masks; it must return one float
            fill per image in [0, 1], of the images' shape or broadcastable to it per image (e.g. (N, 3, 1, 1));
            checked at every call, as a TorchScript inpainter's result is: anything else (a NumPy array, a 0-255
            or [-1, 1] fill, a fill for one image given a batch) is a one-line DiffshieldError.
        multiple: pad H and W to a multiple of this (default 8), a whole number >= 1.
    """

    #: how far outside [0, 1] the function's output may stray (default 0.05) before it is refused
    range_tolerance: float = 0.05

    def __init__(self, fn, multiple: int = 8) -> None:
        super().__init__()
        if not callable(fn):
            raise DiffshieldError(f"FnInpainter needs a function fn(image, mask) -> image, got {type(fn).__name__}")
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise DiffshieldError(f"multiple must be a whole number >= 1, got {multiple!r}")
        self.fn = fn
        self.multiple = multiple

    def fill(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        name = f"the inpainter function {getattr(self.fn, '__name__', type(self.fn).__name__)}"
        return check_fill(self.fn(image, mask), image, name, self.range_tolerance, broadcast=True)


# ----------------------------------------------------------------------------------------------- the FFC network


@dataclass
class FFCConfig:
    """Shape of :class:`FFCInpainterNet`.

    Args:
        base: channels of the full-resolution stem (default 12); doubled at each downsampling.
        n_down: strided downsamplings (default 3: the FFC blocks run at 1/8 resolution).
        n_blocks: FFC residual blocks (default 4).
        ratio_global: fraction of channels in the global (Fourier) branch (default 0.75, as LaMa).
        stem_kernel: kernel of the full-resolution input conv (default 3; LaMa uses 7, costly on a CPU).
    """

    base: int = 12
    n_down: int = 3
    n_blocks: int = 4
    ratio_global: float = 0.75
    stem_kernel: int = 3

    def __post_init__(self) -> None:
        if self.base < 4 or self.n_down < 1 or self.n_down > 4 or self.n_blocks < 1:
            raise DiffshieldError(f"bad inpainter shape {asdict(self)}: need base >= 4, 1 <= n_down <= 4, "
                                  "n_blocks >= 1")
        if self.stem_kernel not in (1, 3, 5, 7):
            raise DiffshieldError(f"stem_kernel must be 1, 3, 5 or 7, got {self.stem_kernel}")
        if not 0 < self.ratio_global < 1:
            raise DiffshieldError(f"ratio_global must lie in (0, 1), got {self.ratio_global}")


class SpectralTransform(nn.Module):
    """LaMa's global branch: 1x1 conv, real FFT, 1x1 conv on (real, imag) channels, inverse FFT, 1x1 conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        mid = max(cout // 2, 1)
        self.inp = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.freq = nn.Sequential(nn.Conv2d(2 * mid, 2 * mid, 1, bias=False), nn.BatchNorm2d(2 * mid),
                                  nn.ReLU(inplace=True))
        self.out = nn.Conv2d(mid, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        h, w = x.shape[-2:]
        f = torch.fft.rfft2(x, norm="ortho")
        f = self.freq(torch.cat([f.real, f.imag], dim=1))
        re, im = f.chunk(2, dim=1)
        y = torch.fft.irfft2(torch.complex(re, im), s=(h, w), norm="ortho")
        return self.out(x + y)


class FFC(nn.Module):
    """Fast Fourier Convolution: local (3x3) and global (spectral) branches exchanging information, each followed by
    BatchNorm and ReLU. Input and output are (local, global) tensor pairs."""

    def __init__(self, ch: int, ratio_global: float) -> None:
        super().__init__()
        g = int(round(ch * ratio_global))
        lo = ch - g
        self.l2l = nn.Conv2d(lo, lo, 3, padding=1, padding_mode="reflect", bias=False)
        self.l2g = nn.Conv2d(lo, g, 3, padding=1, padding_mode="reflect", bias=False)
        self.g2l = nn.Conv2d(g, lo, 3, padding=1, padding_mode="reflect", bias=False)
        self.g2g = SpectralTransform(g, g)
        self.bn_l, self.bn_g = nn.BatchNorm2d(lo), nn.BatchNorm2d(g)

    def forward(self, xl: torch.Tensor, xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        yl = F.relu(self.bn_l(self.l2l(xl) + self.g2l(xg)))
        yg = F.relu(self.bn_g(self.l2g(xl) + self.g2g(xg)))
        return yl, yg


class FFCResBlock(nn.Module):
    def __init__(self, ch: int, ratio_global: float) -> None:
        super().__init__()
        self.a, self.b = FFC(ch, ratio_global), FFC(ch, ratio_global)
        self.split = ch - int(round(ch * ratio_global))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xl, xg = x[:, :self.split], x[:, self.split:]
        yl, yg = self.b(*self.a(xl, xg))
        return torch.cat([xl + yl, xg + yg], dim=1)


def _cbr(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, padding_mode="reflect", bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FFCInpainterNet(nn.Module):
    """LaMa-style generator G: (N, 4, H, W) = cat(x * (1 - m), m) -> (N, 3, H, W) in [0, 1] (sigmoid).

    H and W must be multiples of 2 ** n_down. See :class:`FFCConfig` for the arguments.
    """

    def __init__(self, config: FFCConfig | None = None) -> None:
        super().__init__()
        c = config or FFCConfig()
        self.config = c
        layers = [_cbr(4, c.base, c.stem_kernel)]
        ch = c.base
        for _ in range(c.n_down):
            layers.append(_cbr(ch, 2 * ch, 3, stride=2))
            ch *= 2
        self.encoder = nn.Sequential(*layers)
        self.blocks = nn.Sequential(*[FFCResBlock(ch, c.ratio_global) for _ in range(c.n_blocks)])
        ups = []
        for _ in range(c.n_down):
            ups += [nn.ConvTranspose2d(ch, ch // 2, 3, stride=2, padding=1, output_padding=1, bias=False),
                    nn.BatchNorm2d(ch // 2), nn.ReLU(inplace=True)]
            ch //= 2
        self.decoder = nn.Sequential(*ups)
        self.head = nn.Conv2d(ch, 3, 3, padding=1, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.decoder(self.blocks(self.encoder(x)))))


class ToyInpainter(Inpainter):
    """``f(x, m) = m * G(cat(x * (1 - m), m)) + (1 - m) * x`` with G an :class:`FFCInpainterNet` (eval mode)."""

    def __init__(self, net: FFCInpainterNet) -> None:
        super().__init__()
        self.net = net
        self.multiple = 2 ** net.config.n_down

    def fill(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([image * (1 - mask), mask], dim=1))


class TorchScriptInpainter(Inpainter):
    """A user-supplied TorchScript inpainter such as LaMa's ``big-lama.pt``, called as ``module(image, mask)`` with
    image in [0, 1] (N, 3, H, W) and a binary (N, 1, H, W) mask, returning an image in [0, 1].

    Every call checks the result: a module that cannot be called that way, returns something other than one tensor
    of the image's shape, or returns values outside [0, 1] (beyond :attr:`range_tolerance`, e.g. a 0-255 export) is
    refused in one line."""

    #: how far outside [0, 1] the module's output may stray (default 0.05) before it is refused
    range_tolerance: float = 0.05

    def __init__(self, module: torch.jit.ScriptModule, name: str = "TorchScript inpainter") -> None:
        super().__init__()
        self.module = module
        self.name = name

    def fill(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        try:
            out = self.module(image, mask)
        except (RuntimeError, TypeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DiffshieldError(f"{self.name} failed when called as model(image, mask) on {tuple(image.shape)} "
                                  f"images: {first[:200]}") from None
        return check_fill(out, image, self.name, self.range_tolerance)


# ----------------------------------------------------------------------------------------------- save / load


def save_toy_inpainter(net: FFCInpainterNet, folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (fp32) for an :class:`FFCInpainterNet` into ``folder``."""
    from safetensors.torch import save_file

    from diffshield.core.io import atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items() if not k.endswith("tracked")}
    save_file(state, str(folder / "model.safetensors"))
    atomic_write_json(folder / "config.json", {"class": "FFCInpainterNet", **asdict(net.config), **(extra or {})})
    return folder


def _load_toy(folder: Path) -> ToyInpainter:
    from safetensors.torch import load_file

    cfg_file, weights = folder / "config.json", folder / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise DiffshieldError(f"'{folder}' is not a toy inpainter folder (needs config.json and model.safetensors); "
                              "rebuild it with 'python -m diffshield.protect.train_inpainter'")
    check_safetensors(weights)
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DiffshieldError(f"'{cfg_file}' is not valid JSON ({type(e).__name__}); re-save the folder with "
                              "save_toy_inpainter") from None
    if not isinstance(raw, dict):
        raise DiffshieldError(f"'{cfg_file}' is not a JSON object; re-save the folder with save_toy_inpainter")
    kw = {k: raw[k] for k in ("base", "n_down", "n_blocks", "ratio_global", "stem_kernel") if k in raw}
    for k, v in kw.items():
        ok = isinstance(v, float | int) if k == "ratio_global" else isinstance(v, int)
        if isinstance(v, bool) or not ok:
            want = "a number" if k == "ratio_global" else "a whole number"
            raise DiffshieldError(f"'{cfg_file}': {k} must be {want}, got {v!r}")
    cfg = FFCConfig(**kw)
    net = FFCInpainterNet(cfg)
    try:
        missing, unexpected = net.load_state_dict(load_file(str(weights)), strict=False)
    except RuntimeError as e:  # tensors of the wrong shape: config.json describes another network
        import re

        names = re.findall(r"size mismatch for (\S+?):", str(e))
        detail = (f"{len(names)} tensors of another shape, e.g. {names[0]}" if names
                  else (str(e).strip().splitlines() or [type(e).__name__])[0][:120])
        raise DiffshieldError(f"weights in '{weights}' do not match its config.json ({detail}); re-save the "
                              "folder") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise DiffshieldError(f"weights in '{weights}' do not match its config.json ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected tensors); re-save the folder")
    return ToyInpainter(net.eval()).eval()


def load_inpainter(spec: str | Path = "toy", device: torch.device | str = "cpu") -> Inpainter:
    """Load an inpainter in eval mode with frozen parameters.

    Args:
        spec: ``'toy'`` / ``'toy:inpaint'`` (default: the shipped toy inpainter), a folder with config.json +
            model.safetensors (a toy inpainter you trained), or a TorchScript file (``big-lama.pt``).
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"auto"``. Inpainters run in float32 (their
            Fourier layers need it; the perturbation is float32 anyway).
    """
    from diffshield.core.device import resolve_device

    device = resolve_device(device)
    s = str(spec)
    if s == "toy" or s.startswith("toy:"):  # a name; anything else (toy_inpainter/, ...) is a path
        if s not in TOY_INPAINTERS:
            raise DiffshieldError(f"unknown toy inpainter {s!r}; use 'toy' (= 'toy:inpaint') or a path")
        model: Inpainter = _load_toy(TOY_ROOT / TOY_INPAINTERS[s])
    else:
        path = Path(s).expanduser()
        if not path.exists():
            raise DiffshieldError(f"inpainter '{path}' does not exist; give 'toy' or a TorchScript file "
                                  "(e.g. big-lama.pt)")
        if path.is_dir():
            model = _load_toy(path)
        else:
            if not zipfile.is_zipfile(path):
                raise DiffshieldError(f"'{path}' is not a TorchScript archive; export the inpainter with "
                                      "torch.jit.script/trace and torch.jit.save (as LaMa's big-lama.pt)")
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except (RuntimeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DiffshieldError(f"could not load TorchScript inpainter '{path}': {first}") from None
            model = TorchScriptInpainter(module.eval(), name=f"TorchScript inpainter '{path}'")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device).eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
