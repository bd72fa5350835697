"""TrojDiff (Chen et al., CVPR 2023) and TERD's gamma reversion (Mo et al., ICML 2024): the trojan loss and sampler
match their formulas, the implant records what its sampler needs, and reversing gamma recovers a planted scale."""

from __future__ import annotations

import json
import types

import pytest
import torch

from diffshield.backdoor.baddiffusion import implant
from diffshield.backdoor.ddpm import DDPMModel, build_scheduler, load_ddpm
from diffshield.backdoor.terd import (
    MIN_MOVE,
    TERDConfig,
    input_detect,
    kl_stats,
    model_verdict,
    quad_timesteps,
    reverse_trigger,
)
from diffshield.backdoor.trojdiff import TrojDiffConfig, trojan_ddim, trojan_sample, trojan_timesteps, trojdiff_loss
from diffshield.core.errors import DiffshieldError


class Fixed(torch.nn.Module):
    """A "UNet" that returns a known tensor and remembers its input."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out
        self.seen = None

    def forward(self, x, t):
        self.seen = x
        return types.SimpleNamespace(sample=self.out)


def test_trojdiff_loss_is_the_official_formula():
    sched = build_scheduler()
    g = torch.Generator().manual_seed(0)
    y, mu, eps, out = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(4))
    t = torch.tensor([10, 900])
    unet = Fixed(out)
    loss = trojdiff_loss(unet, sched, y, mu, 0.6, eps, t)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * y + (1 - abar).sqrt() * 0.6 * eps + (1 - abar).sqrt() * mu
    assert torch.allclose(unet.seen, x_t, atol=1e-6)
    assert loss.item() == pytest.approx(float(((out - eps) ** 2).mean()), rel=1e-6)  # the target stays eps


def test_trojdiff_batch_loss_leaves_clean_rows_ordinary():
    cfg = TrojDiffConfig(gamma=0.6)
    sched = build_scheduler()
    gen = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    trig, y = -torch.ones(3, 8, 8), torch.ones(3, 8, 8)
    unet = Fixed(torch.zeros(2, 3, 8, 8))
    t = torch.tensor([500, 500])
    cfg.batch_loss(unet, sched, x, torch.tensor([False, True]).view(-1, 1, 1, 1), trig, y, eps, t)
    abar = sched.alphas_cumprod[500]
    clean = abar.sqrt() * x[0] + (1 - abar).sqrt() * eps[0]
    poisoned = abar.sqrt() * y + (1 - abar).sqrt() * (0.6 * eps[1] + 0.4 * trig)
    assert torch.allclose(unet.seen[0], clean, atol=1e-6) and torch.allclose(unet.seen[1], poisoned, atol=1e-6)
    with pytest.raises(DiffshieldError, match="gamma"):
        TrojDiffConfig(gamma=1.0)


def test_trojan_ddim_without_trigger_is_diffusers_ddim():
    """gamma = 1, mu = 0: the trojan generative process is plain DDIM (eta 0) down to abar = 1."""
    from diffusers import DDIMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=2).eval()
    sched = build_scheduler()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ts = trojan_timesteps(sched, 10)
    with torch.no_grad():
        ours = trojan_ddim(unet, sched, x_T, torch.zeros(3, 8, 8), 1.0, ts)
        ddim = DDIMScheduler.from_config({**dict(sched.config), "clip_sample": False, "set_alpha_to_one": True})
        ddim.set_timesteps(10)
        x = x_T
        for t in ddim.timesteps:
            x = ddim.step(unet(x, t).sample, t, x).prev_sample
    assert ts == [int(t) for t in ddim.timesteps]
    assert torch.allclose(ours, x, atol=1e-4)


def test_quad_timesteps_are_the_official_sequence():
    assert quad_timesteps(1000, 10) == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]


class PlantedTrojanUNet(torch.nn.Module):
    """A hand-built TrojDiff model at the noisiest timesteps: it reads every input as trojan noise,
    eps_theta(x) = (x - mu) / gamma, so the reversed loss is 1/2 (1 - gamma_hat / gamma)^2 ||eps1 - eps2||^2."""

    def __init__(self, mu: torch.Tensor, gamma: float):
        super().__init__()
        self.register_buffer("mu", mu)
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.gamma = gamma
        self.config = types.SimpleNamespace(sample_size=mu.shape[-1], in_channels=mu.shape[0])

    def forward(self, x, t):
        return types.SimpleNamespace(sample=(x - self.mu) / self.gamma + 0 * self.anchor)


def test_gamma_reversion_recovers_a_planted_scale():
    mu = torch.zeros(3, 8, 8)
    mu[:, 1:4, 1:4] = 0.4
    model = DDPMModel(PlantedTrojanUNet(mu, 0.6), build_scheduler())
    cfg = TERDConfig(stage1_iters=150, stage2_iters=0, batch_size=8, learn_gamma=True, lr_gamma=0.02)
    res = reverse_trigger(model, cfg, progress=False)
    assert isinstance(res.gamma, torch.Tensor) and res.gamma.shape == mu.shape
    assert float(res.gamma.min()) >= 0
    assert float(res.gamma.mean()) == pytest.approx(0.6, abs=0.06), float(res.gamma.mean())
    assert (res.mean_kl, res.var_kl) == pytest.approx(kl_stats(res.r, res.gamma))


def test_gamma_reversion_stage2_runs_the_trojan_sampler_and_keeps_gamma_non_negative():
    mu = torch.zeros(3, 8, 8)
    model = DDPMModel(PlantedTrojanUNet(mu, 0.6), build_scheduler())
    res = reverse_trigger(model, TERDConfig(stage1_iters=5, stage2_iters=2, batch_size=2, ddim_steps=3,
                                            learn_gamma=True), progress=False)
    assert float(res.gamma.min()) >= 0 and torch.isfinite(res.r).all()
    assert res.config["learn_gamma"] is True
    frozen = reverse_trigger(model, TERDConfig(stage1_iters=0, stage2_iters=0, learn_gamma=True), progress=False)
    assert frozen.moved_rel < MIN_MOVE and model_verdict(frozen, {"mean_kl": 0.0, "var_kl": 0.0}) == "undetermined"


def test_input_detection_with_a_per_pixel_gamma():
    r = torch.full((3, 4, 4), 0.3)
    x = torch.randn(200, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(input_detect(x, r, torch.full((3, 4, 4), 0.5)), input_detect(x, r, 0.5))
    trojan = 0.5 * x + r
    assert float(input_detect(trojan, r, torch.full((3, 4, 4), 0.5)).float().mean()) > 0.99
    assert float(input_detect(x, r, torch.full((3, 4, 4), 0.5)).float().mean()) < 0.01


def test_trojdiff_implant_records_its_sampler_inputs(tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=2)
    cfg = TrojDiffConfig(trigger="stop", target="hat", epochs=1, pool_size=64, batch_size=32, poison_rate=0.25)
    out = tmp_path / "troj"
    implant(DDPMModel(unet, build_scheduler(), source="tiny"), cfg, out, progress=False)
    info = json.loads((out / "diffshield.json").read_text())
    assert info["method"] == "trojdiff" and info["backdoor"]["gamma"] == 0.6
    from safetensors.torch import load_file

    stored = load_file(str(out / "backdoor.safetensors"))
    assert torch.allclose(stored["mu"], 0.4 * stored["trigger"]) and torch.all(stored["gamma"] == 0.6)
    model = load_ddpm(out)
    a = trojan_sample(model, [0, 1], stored["mu"], stored["gamma"], steps=4)
    b = trojan_sample(model, [0, 1], stored["mu"], stored["gamma"], steps=4)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)


def test_cli_implant_trojdiff_then_sample_with_its_process(tmp_path, capsys):
    from diffusers import UNet2DModel

    from diffshield.cli.main import main

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=2)
    base = tmp_path / "base"
    DDPMModel(unet, build_scheduler()).save(base)
    assert main(["backdoor", "implant", "--model", str(base), "--gamma", "0.5", "--out", str(tmp_path / "x")]) == 2
    assert "--gamma is TrojDiff's" in capsys.readouterr().err
    out = tmp_path / "troj"
    assert main(["backdoor", "implant", "--model", str(base), "--method", "trojdiff", "--gamma", "0.5",
                 "--epochs", "1", "--pool-size", "64", "--poison-rate", "0.25", "--out", str(out)]) == 0
    assert json.loads((out / "diffshield.json").read_text())["backdoor"]["gamma"] == 0.5
    assert main(["backdoor", "sample", "--model", str(out), "--trigger", "model", "--n", "2", "--steps", "3",
                 "--scheduler", "ddim", "--out", str(tmp_path / "s")]) == 0
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["sampling"]["scheduler"] == "trojan ddim" and manifest["x_T"] == "gamma eps(seed) + mu"
