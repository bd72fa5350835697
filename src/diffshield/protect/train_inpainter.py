"""Train the toy LaMa-style inpainter (``toy:inpaint``) on toy scenes, on a CPU, resumably.

Recipe: a pool of rendered 64 px scenes (:func:`diffshield.protect.scenes.make_scenes`), random flips and
transposes, a fresh random hole per image and step (the dilated object, with the scene rendered without it as ground
truth; boxes; brush strokes), L1 loss inside the hole plus 0.1 x L1 over the whole raw output, Adam with cosine
decay. LaMa (Suvorov et al., WACV 2022) adds adversarial and perceptual losses; ``--adv-weight`` (a small patch-GAN)
and ``--grad-weight`` (an image-gradient L1) are available but off by default: they did not make the toy model any
more sensitive to Attack as Defense (docs/protect.md, findings). ``--size``, ``--base``, ``--n-down`` and
``--n-blocks`` change the scenes and the network's shape. Checkpoints every ``ckpt_every`` steps in ``work``; a
rerun resumes from the latest.

Reproduce the shipped weights::

    python -m diffshield.protect.train_inpainter --work runs/protect/inpaint \\
        --out src/diffshield/toyworld/weights/inpaint --steps 1600 --threads 1
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffshield.core.errors import DiffshieldError
from diffshield.core.io import atomic_write_bytes, atomic_write_json
from diffshield.core.seeding import seed_everything
from diffshield.protect.inpainters import (
    FFCConfig,
    FFCInpainterNet,
    ToyInpainter,
    count_parameters,
    save_toy_inpainter,
)
from diffshield.protect.scenes import SceneBatch, benign_masks, make_scenes, protected_masks, training_masks


@dataclass
class InpaintTrainConfig:
    """Training recipe of the toy inpainter.

    Args:
        steps: optimiser steps (default 1600, as the shipped weights).
        batch_size: scenes per step (default 32).
        lr: peak Adam learning rate, cosine-decayed to 5 % (default 2e-3).
        pool_size: rendered training scenes, augmented by the 8 flips/transposes (default 4000).
        size: scene side in pixels (default 64).
        seed: master seed (default 0); held-out scenes use seed + 1000.
        ckpt_every: steps between checkpoints (default 100).
        n_eval: held-out scenes for the fill PSNR at the end (default 200).
        adv_weight: weight of a non-saturating patch-GAN adversarial term on the composited output, as LaMa's
            adversarial loss (default 0: off; the discriminator is a small 3-layer patch CNN with an R1 penalty).
        grad_weight: weight of an L1 loss between the image gradients (finite differences) of the output and the
            ground truth inside the hole, which rewards sharp fills (default 0: off).
    """

    steps: int = 1600
    batch_size: int = 32
    lr: float = 2e-3
    pool_size: int = 4000
    size: int = 64
    seed: int = 0
    ckpt_every: int = 100
    n_eval: int = 200
    adv_weight: float = 0.0
    grad_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "pool_size", "ckpt_every", "n_eval"):
            if getattr(self, name) < 1:
                raise DiffshieldError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr < 1:
            raise DiffshieldError(f"lr must lie in (0, 1), got {self.lr}")
        if self.size < 32 or self.size % 8:
            raise DiffshieldError(f"size must be a multiple of 8 and at least 32, got {self.size}")


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    k = int(rng.integers(8))
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    if k & 4:
        x = x.transpose(-1, -2)
    return x


class PatchDiscriminator(nn.Module):
    """A small patch-GAN discriminator (LaMa uses a deeper NLayerDiscriminator): 4-channel input (image, mask),
    three strided 4x4 convs with LeakyReLU, one logit per 8x8 patch."""

    def __init__(self, base: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(4, base, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(base, 2 * base, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * base, 4 * base, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * base, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, m], 1))


def _grad_l1(y: torch.Tensor, gt: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    dy = [y.diff(dim=d) - gt.diff(dim=d) for d in (-1, -2)]
    mm = [torch.maximum(m[..., 1:], m[..., :-1]), torch.maximum(m[..., 1:, :], m[..., :-1, :])]
    return sum((d.abs() * w).sum() / (3 * w.sum()).clamp_min(1) for d, w in zip(dy, mm, strict=True)) / 2


def fill_psnr(inpainter, images: torch.Tensor, masks: torch.Tensor, truth: torch.Tensor | None = None,
              batch: int = 50) -> float:
    """Mean over images of the PSNR (dB) inside the hole between the fill and the ground truth (default: the
    images themselves)."""
    truth = images if truth is None else truth
    vals = []
    with torch.no_grad():
        for i in range(0, len(masks), batch):
            x, m, t = images[i:i + batch], masks[i:i + batch], truth[i:i + batch]
            y = inpainter(x, m)
            mse = ((y - t) ** 2 * m).sum((1, 2, 3)) / (3 * m.sum((1, 2, 3))).clamp_min(1)
            vals += (10 * torch.log10(1 / mse.clamp_min(1e-10))).tolist()
    return float(np.mean(vals))


def train(config: InpaintTrainConfig, work: str | Path, out: str | Path | None = None,
          net_config: FFCConfig | None = None, log=print) -> dict:
    """Train (or resume) and write the shipped folder to ``out``. Returns the training record (also saved to
    ``work/record.json`` and ``out/config.json``)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    net_config = net_config or FFCConfig()
    net = FFCInpainterNet(net_config)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.9, 0.99))
    disc = opt_d = None
    if config.adv_weight > 0:
        disc = PatchDiscriminator()
        opt_d = torch.optim.Adam(disc.parameters(), lr=config.lr / 2, betas=(0.5, 0.99))
    ckpt = work / "checkpoint.pt"
    start, elapsed = 0, 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        if disc is not None and "disc" in state:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["opt_d"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
        log(f"resuming from step {start} ({elapsed / 60:.1f} min so far)")
    t0 = time.time()
    pool = make_scenes(config.pool_size, config.size, seed=config.seed)
    log(f"rendered {config.pool_size} scenes in {time.time() - t0:.1f} s; {count_parameters(net)} parameters")
    net.train()
    t_start = time.time()
    rng = np.random.default_rng([config.seed, start])
    losses = []
    for step in range(start, config.steps):
        lr = config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        if opt_d is not None:
            for g in opt_d.param_groups:
                g["lr"] = lr / 2
        idx = rng.integers(0, config.pool_size, config.batch_size)
        sub = SceneBatch(pool.images[idx], pool.object_masks[idx], [pool.shape_masks[i] for i in idx],
                         pool.without_object[idx])
        m, gt = training_masks(sub, rng)
        k = int(rng.integers(8))
        x, m, gt = (_augment(t, np.random.default_rng(k)) for t in (sub.images, m, gt))
        y = net(torch.cat([x * (1 - m), m], 1))
        hole = ((y - gt).abs() * m).sum() / (3 * m.sum()).clamp_min(1)
        loss = hole + 0.1 * (y - gt).abs().mean()
        if config.grad_weight > 0:
            loss = loss + config.grad_weight * _grad_l1(y, gt, m)
        if disc is not None:
            comp = m * y + (1 - m) * gt
            loss = loss + config.adv_weight * F.softplus(-disc(comp, m)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if disc is not None:  # non-saturating GAN loss + R1 on real images (LaMa: weight 0.001, here 0.01)
            real = gt.detach().requires_grad_(True)
            d_real = disc(real, m)
            r1 = torch.autograd.grad(d_real.sum(), real, create_graph=True)[0].pow(2).sum((1, 2, 3)).mean()
            d_loss = F.softplus(-d_real).mean() + F.softplus(disc(comp.detach(), m)).mean() + 0.01 * r1
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        losses.append(hole.item())
        done = step + 1
        if done % config.ckpt_every == 0 or done == config.steps:
            el = elapsed + time.time() - t_start
            buf = __import__("io").BytesIO()
            state = {"net": net.state_dict(), "opt": opt.state_dict(), "step": done, "elapsed": el}
            if disc is not None:
                state.update(disc=disc.state_dict(), opt_d=opt_d.state_dict())
            torch.save(state, buf)
            atomic_write_bytes(ckpt, buf.getvalue())
            log(f"step {done}/{config.steps}  hole L1 {np.mean(losses[-config.ckpt_every:]):.4f}  lr {lr:.2e}  "
                f"{el / 60:.1f} min")
    elapsed += time.time() - t_start
    net.eval()
    inp = ToyInpainter(net).eval()
    held = make_scenes(config.n_eval, config.size, seed=config.seed + 1000)
    pm = protected_masks(held.object_masks)
    hm, ht = training_masks(held, np.random.default_rng(config.seed + 1000))

    record = {
        "recipe": asdict(config),
        "net": asdict(net_config),
        "parameters": count_parameters(net),
        "train_minutes": round(elapsed / 60, 2),
        "torch_threads": torch.get_num_threads(),
        "heldout_fill_psnr_db": round(fill_psnr(inp, held.images, hm, ht), 2),
        "heldout_object_removal_psnr_db": round(fill_psnr(inp, held.images, pm, held.without_object), 2),
        "heldout_box_psnr_db": round(fill_psnr(inp, held.images, benign_masks(pm)), 2),
        "command": "python -m diffshield.protect.train_inpainter " + " ".join(sys.argv[1:]),
    }
    atomic_write_json(work / "record.json", record)
    log(f"held-out fill PSNR {record['heldout_fill_psnr_db']} dB (random training-style holes), "
        f"{record['heldout_object_removal_psnr_db']} dB (object removal vs the scene without it), "
        f"{record['heldout_box_psnr_db']} dB (boxes outside the object)")
    if out:
        save_toy_inpainter(net, out, extra={"training": record})
        log(f"wrote {out}")
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffshield.protect.train_inpainter",
                                description="Train the toy LaMa-style FFC inpainter on toy scenes (resumable).")
    d = InpaintTrainConfig()
    p.add_argument("--work", default="runs/protect/inpaint", help="checkpoints and record (default: "
                                                                   "runs/protect/inpaint)")
    p.add_argument("--out", help="write the shipped folder (config.json + model.safetensors) here")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimiser steps (default: {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"batch (default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--pool-size", type=int, default=d.pool_size, help=f"scenes (default: {d.pool_size})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed (default: {d.seed})")
    p.add_argument("--size", type=int, default=d.size, help=f"scene side in px (default: {d.size})")
    p.add_argument("--adv-weight", type=float, default=d.adv_weight,
                   help=f"patch-GAN adversarial loss weight (default: {d.adv_weight}, off)")
    p.add_argument("--grad-weight", type=float, default=d.grad_weight,
                   help=f"image-gradient L1 loss weight (default: {d.grad_weight}, off)")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help=f"checkpoint period (default: {d.ckpt_every})")
    n = FFCConfig()
    p.add_argument("--base", type=int, default=n.base, help=f"stem channels (default: {n.base})")
    p.add_argument("--n-down", type=int, default=n.n_down, help=f"strided downsamplings (default: {n.n_down})")
    p.add_argument("--n-blocks", type=int, default=n.n_blocks, help=f"FFC residual blocks (default: {n.n_blocks})")
    p.add_argument("--ratio-global", type=float, default=n.ratio_global,
                   help=f"global channel ratio in FFC blocks (default: {n.ratio_global})")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    try:
        cfg = InpaintTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, pool_size=args.pool_size,
                                 seed=args.seed, size=args.size, adv_weight=args.adv_weight,
                                 grad_weight=args.grad_weight, ckpt_every=args.ckpt_every)
        net_cfg = FFCConfig(base=args.base, n_down=args.n_down, n_blocks=args.n_blocks,
                            ratio_global=args.ratio_global)
        train(cfg, args.work, args.out, net_config=net_cfg, log=lambda s: print(s, flush=True))
    except DiffshieldError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
