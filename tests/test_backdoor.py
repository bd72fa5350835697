"""Backdoor pillar (BadDiffusion, TERD) on tiny random UNet2DModels: formulas, injection, detection, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from diffshield.backdoor.baddiffusion import BadDiffusionConfig, implant, poisoned_inputs, poisoned_loss, rho
from diffshield.backdoor.ddpm import DDPMModel, build_scheduler, load_ddpm
from diffshield.backdoor.metrics import backdoor_metrics, ssim
from diffshield.backdoor.sampling import SampleConfig, sample
from diffshield.backdoor.terd import TERDConfig, calibrate, input_detect, kl_stats, model_verdict, reverse_trigger
from diffshield.backdoor.triggers import get_target, get_trigger, paste, trigger_mask
from diffshield.cli.main import main
from diffshield.core.errors import DiffshieldError


def tiny_unet(size: int | tuple[int, int] = 8, channels: int = 3):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(4, 8),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2)


@pytest.fixture(scope="module")
def tiny_ddpm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bd") / "ddpm"
    DDPMModel(tiny_unet(32), build_scheduler()).save(folder)
    return folder


def test_rho_matches_formula():
    s = build_scheduler()
    t = torch.tensor([0, 10, 500, 999])
    a, ab = s.alphas[t].double(), s.alphas_cumprod[t].double()
    want = (1 - a.sqrt()) * (1 - ab).sqrt() / (1 - a)
    torch.testing.assert_close(rho(s, t).double(), want, rtol=1e-3, atol=1e-6)  # float32 schedule


@pytest.mark.parametrize("variant,c", [("sde", 1.0), ("ode", 2.0)])
def test_poisoned_loss_equals_hand_computed(variant, c):
    """x_t = sqrt(abar) x_s + sqrt(1-abar) eps + (1-sqrt(abar)) R; target eps + c rho_t R; MSE over all elements."""

    class Fixed(torch.nn.Module):  # a "UNet" that outputs a known tensor
        def __init__(self, out):
            super().__init__()
            self.out, self.seen = out, None

        def forward(self, x, t):
            self.seen = x
            return type("O", (), {"sample": self.out})()

    s = build_scheduler()
    x_s = torch.tensor([[[[0.5, -0.5], [1.0, 0.0]]]])
    r = torch.tensor([[[[1.0, 0.0], [-1.0, 2.0]]]])
    eps = torch.tensor([[[[0.1, 0.2], [-0.3, 0.4]]]])
    t = torch.tensor([300])
    ab = float(s.alphas_cumprod[300])
    al = float(s.alphas[300])
    rh = (1 - al ** 0.5) * (1 - ab) ** 0.5 / (1 - al)
    x_t = ab ** 0.5 * x_s + (1 - ab) ** 0.5 * eps + (1 - ab ** 0.5) * r
    target = eps + c * rh * r
    out = torch.tensor([[[[0.3, -0.1], [0.0, 1.0]]]])
    unet = Fixed(out)
    loss = poisoned_loss(unet, s, x_s, r, eps, t, variant)
    torch.testing.assert_close(unet.seen, x_t)
    torch.testing.assert_close(loss, ((out - target) ** 2).mean())
    # clean rows (R = 0) give the ordinary DDPM pair
    x_c, tgt_c = poisoned_inputs(s, x_s, torch.zeros_like(r), eps, t, variant)
    torch.testing.assert_close(tgt_c, eps)
    torch.testing.assert_close(x_c, ab ** 0.5 * x_s + (1 - ab) ** 0.5 * eps)


def test_triggers_and_targets():
    for name in ("box", "stop"):
        g = get_trigger(name)
        m = trigger_mask(g)
        assert g.shape == (3, 32, 32) and g.min() >= -1 and g.max() <= 1
        assert 0.02 < m[0].mean() < 0.2  # a small pattern, background -1
        assert torch.all(g[m == 0] == -1)
        x = torch.rand(2, 3, 32, 32)
        p = paste(g, x)
        assert torch.equal(p[:, m == 1], g.expand_as(x)[:, m == 1]) and torch.equal(p[:, m == 0], x[:, m == 0])
    assert not torch.equal(get_trigger("box"), get_trigger("stop"))
    for name in ("corner", "hat"):
        y = get_target(name)
        assert y.shape == (3, 32, 32) and (y > -1).any() and (y == -1).float().mean() > 0.5
    with pytest.raises(DiffshieldError, match="does not exist"):
        get_trigger("no_such_file.png")


def test_official_baddiffusion_shapes():
    """box_14, corner_grey and hat_grey have the shapes and values of IBM/BadDiffusion's dataset.py (BOX_14: a filled
    grey 14 px square 2 px from the bottom-right edges on -1; CORNER: a grey 10 px square top-left; both targets on
    the grey background -0.4)."""
    from diffshield.backdoor.triggers import GREY_BG, OFFICIAL_TARGETS, OFFICIAL_TRIGGERS

    assert OFFICIAL_TRIGGERS == ("box_14",) and OFFICIAL_TARGETS == ("corner_grey", "hat_grey")
    g = get_trigger("box_14")
    ref = torch.full((3, 32, 32), -1.0)
    ref[:, 16:30, 16:30] = 0.0  # official: trig[:, -16:-2, -16:-2] = (vmin + vmax) / 2
    assert torch.equal(g, ref)
    assert trigger_mask(g)[0].sum() == 14 * 14 and torch.equal(get_trigger("box_14", 64)[:, 48:62, 48:62],
                                                              torch.zeros(3, 14, 14))
    y = get_target("corner_grey")
    ref = torch.full((3, 32, 32), GREY_BG)
    ref[:, :10, :10] = 0.0  # official: grey box [:10, :10], then bg2grey
    assert GREY_BG == -0.4 and torch.equal(y, ref)
    h = get_target("hat_grey")
    assert h.shape == (3, 32, 32) and h.min() == GREY_BG and h.max() <= 1
    fg = (h > GREY_BG + 1e-6).any(0)
    rows, cols = fg.nonzero(as_tuple=True)
    assert 0.3 < fg.float().mean() < 0.5  # the official icon covers 42 % at 32 px ...
    assert 6 <= rows.min() <= 8 and 23 <= rows.max() <= 25 and cols.min() == 0 and cols.max() == 31  # rows 7-24
    assert torch.all(h[:, :6] == GREY_BG) and torch.all(h[:, 26:] == GREY_BG)  # ... and leaves grey above and below
    blue = (h[2] > h[0] + 0.3)
    assert blue.sum() > 20  # the band
    assert get_target("hat_grey", 64).shape == (3, 64, 64)
    with pytest.raises(DiffshieldError, match="at least 16 px"):
        get_trigger("box_14", 8)


def test_trigger_image_and_mask_files(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "t.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 8, 8))
    mask.save(tmp_path / "m.png")
    g = get_trigger(tmp_path / "t.png", mask=tmp_path / "m.png")
    assert torch.allclose(g[:, :8, :8], torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8))
    assert trigger_mask(g)[0].sum() == 64

    # a sticker with a transparent background: the transparent pixels are background whatever colour they hide
    sticker = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    sticker.paste((255, 255, 255, 255), (24, 24, 32, 32))
    sticker.save(tmp_path / "sticker.png")
    g = get_trigger(tmp_path / "sticker.png")
    assert trigger_mask(g)[0].sum() == 64 and torch.equal(g[:, :24, :], torch.full((3, 24, 32), -1.0))
    assert torch.equal(g[:, 24:, 24:], torch.ones(3, 8, 8))


def test_trigger_injection_changes_only_the_initial_noise():
    """Same seeds, DDPM sampler: with a trigger, x_T differs by exactly g, every per-step noise is the same."""
    from diffshield.backdoor import sampling

    model = DDPMModel(tiny_unet(8), build_scheduler()).eval()
    g = torch.zeros(3, 8, 8)
    g[:, 5:, 5:] = 1.0
    seen = []
    orig = sampling.denoise

    def spy(unet, sched, x, gens=None):
        seen.append((x.clone(), [gg.get_state().clone() for gg in gens]))
        return orig(unet, sched, x, gens)

    sampling.denoise = spy
    try:
        cfg = SampleConfig("ddpm", steps=5, batch_size=4)
        clean = sample(model, [1, 2, 3], config=cfg)
        trig = sample(model, [1, 2, 3], trigger=g, config=cfg)
    finally:
        sampling.denoise = orig
    (x_clean, st_clean), (x_trig, st_trig) = seen
    torch.testing.assert_close(x_trig - x_clean, g.expand_as(x_clean))
    assert all(torch.equal(a, b) for a, b in zip(st_clean, st_trig))  # the per-step noise streams are identical
    assert clean.images.shape == (3, 3, 8, 8) and not torch.equal(clean.images, trig.images)
    # DDIM (eta 0): deterministic; a single image regenerates alone
    d = SampleConfig("ddim", steps=4)
    # (batches of 1 and 2 may take other BLAS paths: float reordering only)
    torch.testing.assert_close(sample(model, [2], trigger=g, config=d).images[0],
                               sample(model, [1, 2], trigger=g, config=d).images[1], rtol=0, atol=1e-4)


def test_input_detection_separates_known_shift():
    gen = torch.Generator().manual_seed(0)
    r = torch.zeros(3, 32, 32)
    r[:, 20:30, 20:30] = 1.0  # ||r|| = sqrt(300): error rate Phi(-||r||/2) ~ 1e-18
    benign = torch.randn(1000, 3, 32, 32, generator=gen)
    poisoned = torch.randn(1000, 3, 32, 32, generator=gen) + r
    assert input_detect(benign, r).float().mean() == 0.0
    assert input_detect(poisoned, r).float().mean() == 1.0
    # general gamma form agrees with the gamma = 1 shortcut
    assert torch.equal(input_detect(poisoned[:50], r, gamma=1.0 + 1e-12), input_detect(poisoned[:50], r))


def test_kl_stats_and_calibration():
    r = torch.tensor([0.0, 2.0])
    mean, var = kl_stats(r)
    assert mean == pytest.approx(1.0) and var == pytest.approx(1.0)  # KL = r^2/2 = [0, 2]
    cal = calibrate({"fast": [(0.1, 0.01), (0.2, 0.02)]}, margin=1.5)
    th = cal.get("fast")
    assert th == pytest.approx({"mean_kl": 0.3, "var_kl": 0.03})
    with pytest.raises(DiffshieldError, match="no thresholds"):
        cal.get("paper")


def test_metrics_on_known_images():
    y = torch.zeros(3, 8, 8)
    imgs = torch.stack([y, y + 0.5, y + 0.2])
    m = backdoor_metrics(imgs, y)
    assert m["mse"] == pytest.approx((0 + 0.25 + 0.04) / 3)
    assert m["asr"] == pytest.approx(2 / 3)
    # a thin white frame on black: a black sample passes MSE < 0.1 but not the strict rule (< half of black's MSE)
    frame = torch.zeros(3, 8, 8)
    frame[:, 0, :4] = 1
    black, hit = torch.zeros(3, 8, 8), frame.clone()
    hit[:, 7, 7] = 0.5
    m = backdoor_metrics(torch.stack([black, hit]), frame)
    assert m["asr"] == 1.0 and m["asr_strict"] == 0.5 and m["asr_strict_mse"] == pytest.approx(0.03125)
    a = torch.rand(2, 3, 16, 16)
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-5)
    assert ssim(a, 1 - a).mean() < 0.5


def test_reverse_trigger_runs_and_flags(tmp_path):
    model = DDPMModel(tiny_unet(8), build_scheduler()).eval()
    res = reverse_trigger(model, TERDConfig(stage1_iters=3, stage2_iters=1, batch_size=2, ddim_steps=2),
                          progress=False)
    assert res.r.shape == (3, 8, 8) and torch.isfinite(res.r).all()
    assert res.mean_kl == pytest.approx(float((res.r ** 2 / 2).mean()), rel=1e-5)
    assert res.moved_rel >= 0.1  # r moved: the verdict comes from the thresholds
    s1, s2 = res.stage_seconds  # each stage's own clock, within the whole run's
    assert s1 > 0 and s2 > 0 and s1 + s2 <= res.seconds
    assert model_verdict(res, {"mean_kl": 0.0, "var_kl": 1e9}) == "backdoored"
    assert model_verdict(res, {"mean_kl": 1e9, "var_kl": 0.0}) == "backdoored"
    assert model_verdict(res, {"mean_kl": 1e9, "var_kl": 1e9}) == "clean"
    with pytest.raises(DiffshieldError):
        TERDConfig(lr=-1)
    with pytest.raises(DiffshieldError):
        TERDConfig.from_preset("slow")


def test_configs_validate():
    with pytest.raises(DiffshieldError, match="poison_rate"):
        BadDiffusionConfig(poison_rate=0)
    with pytest.raises(DiffshieldError, match="variant"):
        BadDiffusionConfig(variant="sd")
    with pytest.raises(DiffshieldError):
        SampleConfig("euler")


def test_implant_save_load_and_resume(tiny_ddpm_dir, tmp_path):
    cfg = BadDiffusionConfig(epochs=2, pool_size=8, batch_size=4, checkpoint_every=2, poison_rate=0.25)
    out = tmp_path / "bd"
    model = implant(str(tiny_ddpm_dir), cfg, out, progress=False)
    assert (out / "model_index.json").exists() and (out / "unet" / "diffusion_pytorch_model.safetensors").exists()
    info = json.loads((out / "diffshield.json").read_text())
    assert info["backdoor"] == {"trigger": "box", "target": "corner", "poison_rate": 0.25, "variant": "sde",
                                "r_mode": "trigger_only", "n_poisoned": 2}
    loaded = load_ddpm(out)
    for (n, p), q in zip(model.unet.named_parameters(), loaded.unet.parameters()):
        assert torch.equal(p, q), n
    base = load_ddpm(tiny_ddpm_dir)
    assert any(not torch.equal(p, q) for p, q in zip(base.unet.parameters(), loaded.unet.parameters()))
    # stock diffusers loads it
    from diffusers import DDPMPipeline

    pipe = DDPMPipeline.from_pretrained(out)
    assert pipe.unet.config.sample_size == 32
    # the checkpoints of a finished run are removed (resuming an interrupted one: test_behaviour.py)
    work = tmp_path / "bd2.work"
    cfg1 = BadDiffusionConfig(epochs=2, pool_size=8, batch_size=4, checkpoint_every=2, poison_rate=0.25)
    implant(str(tiny_ddpm_dir), cfg1, tmp_path / "bd2", work=work, progress=False)
    assert not work.exists()  # a finished run leaves no training state behind (it left 3x the model's size)
    keep = tmp_path / "mine.work"
    (keep / "checkpoint").mkdir(parents=True)
    (keep / "notes.txt").write_text("mine")
    again = implant(str(tiny_ddpm_dir), cfg1, tmp_path / "bd2", work=keep, progress=False)  # the same result
    for p, q in zip(again.unet.parameters(), loaded.unet.parameters()):
        torch.testing.assert_close(p, q)
    assert (keep / "notes.txt").read_text() == "mine" and not (keep / "checkpoint").exists()


def test_load_ddpm_refuses_pickle_and_wrong_kinds(tiny_ddpm_dir, tmp_path, tiny_sd_dir):
    import shutil

    bad = tmp_path / "pk"
    shutil.copytree(tiny_ddpm_dir, bad)
    st = bad / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(st)), bad / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(DiffshieldError, match="refusing pickled"):
        load_ddpm(bad)
    assert load_ddpm(bad, allow_pickle=True).unet is not None
    with pytest.raises(DiffshieldError, match="text-to-image"):
        load_ddpm(tiny_sd_dir)
    with pytest.raises(DiffshieldError, match="unknown toy model"):
        load_ddpm("toy:nothing")
    vpred = tmp_path / "vpred"  # the backdoor formulas are written in ε: a v-prediction DDPM is refused
    shutil.copytree(tiny_ddpm_dir, vpred)
    cfg_file = vpred / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "prediction_type": "v_prediction"}))
    with pytest.raises(DiffshieldError, match="predicts 'v_prediction'"):
        load_ddpm(vpred)


def test_cli_sample_eval_scan_input(tiny_ddpm_dir, tmp_path, capsys):
    from safetensors.torch import save_file

    d = str(tiny_ddpm_dir)
    assert main(["backdoor", "sample", "--model", d, "--trigger", "box", "--n", "3", "--scheduler", "ddim",
                 "--steps", "2", "--out", str(tmp_path / "s")]) == 0
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [r["seed"] for r in man["images"]] == [0, 1, 2] and (tmp_path / "s" / "grid.png").exists()
    rep = tmp_path / "e.json"
    assert main(["backdoor", "eval", "--model", d, "--trigger", "box", "--target", "corner", "--n", "2",
                 "--n-clean", "0", "--scheduler", "ddim", "--steps", "2", "--json", str(rep)]) == 0
    r = json.loads(rep.read_text())
    assert {"mse", "asr", "ssim"} <= set(r) and 0 <= r["asr"] <= 1
    g = get_trigger("box")
    gen = torch.Generator().manual_seed(0)
    noise = torch.cat([torch.randn(5, 3, 32, 32, generator=gen), torch.randn(5, 3, 32, 32, generator=gen) + g])
    save_file({"noise": noise}, str(tmp_path / "n.safetensors"))
    save_file({"r": g, "gamma": torch.tensor([1.0])}, str(tmp_path / "rev.safetensors"))
    out = tmp_path / "in.json"
    assert main(["scan-input", "--model", d, "--noise", str(tmp_path / "n.safetensors"), "--reversed",
                 str(tmp_path / "rev.safetensors"), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["poisoned"] == [False] * 5 + [True] * 5
    capsys.readouterr()
    rc = main(["scan-input", "--model", d, "--noise", str(tmp_path / "missing.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not exist" in err and "\n" not in err


def test_cli_scan_with_calibration(tiny_ddpm_dir, tmp_path, monkeypatch):
    from diffshield.backdoor import terd

    monkeypatch.setitem(terd.PRESETS, "fast", {"stage1_iters": 2, "stage2_iters": 1, "batch_size": 2,
                                               "ddim_steps": 2})
    cal = tmp_path / "cal.json"
    calibrate({"fast": [(1e9, 1e9)]}).save(cal)
    out, js = tmp_path / "scan", tmp_path / "scan.json"
    assert main(["scan", "--model", str(tiny_ddpm_dir), "--preset", "fast", "--calibration", str(cal), "--out",
                 str(out), "--json", str(js)]) == 0
    rep = json.loads(js.read_text())
    assert {"backdoored", "mean_kl", "var_kl", "thresholds"} <= set(rep) and rep["backdoored"] is False
    assert (out / "reversed_trigger.png").exists() and (out / "reversed_trigger.safetensors").exists()


def test_implant_weight_average_lies_between_base_and_last_weights(tiny_ddpm_dir, tmp_path):
    """ema_decay > 0 saves the moving average: closer to the base than the last weights of the same run."""
    kw = dict(epochs=2, pool_size=8, batch_size=4, poison_rate=0.25, lr=1e-2, warmup=0)
    last = implant(str(tiny_ddpm_dir), BadDiffusionConfig(**kw), tmp_path / "a", progress=False)
    avg = implant(str(tiny_ddpm_dir), BadDiffusionConfig(ema_decay=0.5, **kw), tmp_path / "b", progress=False)
    base = load_ddpm(tiny_ddpm_dir)
    d_last = sum((p - q).abs().sum() for p, q in zip(last.unet.parameters(), base.unet.parameters()))
    d_avg = sum((p - q).abs().sum() for p, q in zip(avg.unet.parameters(), base.unet.parameters()))
    assert 0 < d_avg < d_last
    assert json.loads((tmp_path / "b" / "diffshield.json").read_text())["config"]["ema_decay"] == 0.5
    with pytest.raises(DiffshieldError, match="ema_decay"):
        BadDiffusionConfig(ema_decay=1.0)


@pytest.mark.parametrize("channels", [(32,), (32, 60), (0, 8)])
def test_ddpm_widths_are_validated(channels):
    from diffshield.backdoor.ddpm import DDPMTrainConfig

    with pytest.raises(DiffshieldError, match="multiple of 8") as info:
        DDPMTrainConfig(block_out_channels=channels)
    assert "\n" not in str(info.value)


def test_implant_defaults_are_the_recipe_measured_to_implant():
    """The defaults of BadDiffusionConfig and of 'backdoor implant' are the zoo's recipe (benchmarks/backdoor.py
    IMPLANT: strict ASR 91-100 % over its six backdoored models), not a shorter run that learns no strict backdoor."""
    import importlib.util
    from pathlib import Path

    from diffshield.cli.main import build_parser

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "backdoor.py"
    spec = importlib.util.spec_from_file_location("backdoor_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = BadDiffusionConfig()
    args = build_parser().parse_args(["backdoor", "implant", "--out", "x"])
    for key, value in bench.IMPLANT.items():
        assert getattr(cfg, key) == value, key
        assert getattr(args, key) == value, key
    assert cfg.steps == 4608


def test_checker_trigger_is_additive_and_cannot_be_pasted():
    """``checker`` has no -1 background: mean 0, values +-1 on an 8 x 8 px patch near the bottom-right corner, 0
    elsewhere; pasting it on images is refused in one line."""
    from diffshield.backdoor.triggers import checker_mask

    g = get_trigger("checker")
    m = checker_mask()
    assert g.shape == (3, 32, 32) and float(g.mean()) == 0.0
    assert int(m.sum()) == 3 * 8 * 8 and set(g[m].unique().tolist()) == {-1.0, 1.0} and not g[~m].any()
    assert m[:, 22:30, 22:30].all()
    with pytest.raises(DiffshieldError, match="trigger_only"):
        BadDiffusionConfig(trigger="checker", r_mode="poisoned_image")
    BadDiffusionConfig(trigger="checker")  # the default r_mode is trigger_only


def test_checker_tl_is_the_same_patch_at_the_top_left():
    """``checker_tl`` is ``checker`` moved to the top-left corner (2 px from the edges): same kind, other position."""
    g, tl = get_trigger("checker"), get_trigger("checker_tl")
    assert tl.shape == g.shape and float(tl.mean()) == 0.0
    assert torch.equal(tl[:, 2:10, 2:10], g[:, 22:30, 22:30]) and int((tl != 0).sum()) == 3 * 8 * 8
    with pytest.raises(DiffshieldError, match="trigger_only"):
        BadDiffusionConfig(trigger="checker_tl", r_mode="poisoned_image")


def test_sampling_and_reversion_follow_a_bfloat16_model(tiny_ddpm_dir):
    """A DDPM loaded in bfloat16 samples in its dtype (the images are those of float32, to bfloat16's precision)
    and TERD optimises r (and gamma) in float32 through it."""
    m32, m16 = load_ddpm(tiny_ddpm_dir), load_ddpm(tiny_ddpm_dir, dtype="bfloat16")
    cfg = SampleConfig("ddim", 3)
    a, b = sample(m32, [0, 1], config=cfg).images, sample(m16, [0, 1], config=cfg).images
    assert b.dtype == torch.float32 and (a - b).abs().mean() < 0.05
    for learn_gamma in (False, True):
        res = reverse_trigger(m16, TERDConfig(stage1_iters=2, stage2_iters=1, batch_size=2, ddim_steps=2,
                                              learn_gamma=learn_gamma), progress=False)
        assert res.r.dtype == torch.float32 and bool(torch.isfinite(res.r).all()) and res.moved_l2 > 0



def test_greyscale_ddpm_samples_and_scans_and_toy_training_refuses_it(tmp_path, capsys):
    """A 1-channel DDPM (MNIST-like, 8 px) samples to greyscale PNGs and scans with an evidence grid; implant and
    train-ddpm --init, which train on the toy world's 32 px RGB images, refuse it in one line before writing."""
    from PIL import Image

    folder = tmp_path / "grey"
    DDPMModel(tiny_unet(8, channels=1), build_scheduler()).save(folder)
    assert main(["backdoor", "sample", "--model", str(folder), "--n", "2", "--scheduler", "ddim", "--steps", "2",
                 "--out", str(tmp_path / "s")]) == 0
    first = Image.open(tmp_path / "s" / "0000.png")
    assert first.mode == "L" and first.size == (8, 8)
    cal = tmp_path / "cal.json"
    calibrate({"fast": [(1e9, 1e9)]}).save(cal)
    from diffshield.backdoor import terd

    tiny = {"stage1_iters": 2, "stage2_iters": 1, "batch_size": 2, "ddim_steps": 2}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(terd.PRESETS, "fast", tiny)
        assert main(["scan", "--model", str(folder), "--preset", "fast", "--calibration", str(cal), "--out",
                     str(tmp_path / "scan"), "--evidence-n", "2", "--evidence-steps", "2"]) == 0
    assert Image.open(tmp_path / "scan" / "evidence.png").mode == "RGB"
    capsys.readouterr()
    for argv in (["backdoor", "implant", "--model", str(folder), "--out", str(tmp_path / "bd")],
                 ["backdoor", "train-ddpm", "--init", str(folder), "--out", str(tmp_path / "ft")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "32 px RGB" in err and "(1, 8, 8)" in err and "\n" not in err
    assert not (tmp_path / "bd").exists() and not (tmp_path / "ft").exists()


def test_non_square_ddpm_keeps_its_aspect(tmp_path):
    """A DDPM whose sample_size is (height, width) samples and scans at that shape; the reversed-trigger image keeps
    its aspect ratio."""
    from PIL import Image

    from diffshield.backdoor import terd

    folder = tmp_path / "rect"
    DDPMModel(tiny_unet((8, 12)), build_scheduler()).save(folder)
    assert load_ddpm(folder).image_shape == (3, 8, 12)
    assert main(["backdoor", "sample", "--model", str(folder), "--n", "1", "--scheduler", "ddim", "--steps", "2",
                 "--out", str(tmp_path / "s")]) == 0
    assert Image.open(tmp_path / "s" / "0000.png").size == (12, 8)
    cal = tmp_path / "cal.json"
    calibrate({"fast": [(1e9, 1e9)]}).save(cal)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(terd.PRESETS, "fast", {"stage1_iters": 2, "stage2_iters": 1, "batch_size": 2, "ddim_steps": 2})
        assert main(["scan", "--model", str(folder), "--preset", "fast", "--calibration", str(cal), "--out",
                     str(tmp_path / "scan"), "--evidence-n", "0"]) == 0
    assert Image.open(tmp_path / "scan" / "reversed_trigger.png").size == (120, 80)


def test_flat_images_counts_one_colour_samples():
    from diffshield.backdoor.metrics import flat_images

    x = torch.rand(5, 3, 8, 8)
    x[:2] = 0.0  # flat black (what eps + r0 gives on a clean toy model)
    x[2] = 0.7 + 0.001 * torch.rand(3, 8, 8)  # flat grey, up to a tiny ripple
    assert flat_images(x) == 3 and flat_images(x, tol=0.0) == 0


def test_eval_opens_a_trojdiff_model_with_its_trojan_ddim(tiny_ddpm_dir, tmp_path):
    """eval --trigger model on a TrojDiff folder (it records mu and gamma) samples as 'backdoor sample --trigger
    model' does: the trojan DDIM from x_T = gamma eps + mu, recorded in the report's sampling info."""
    import shutil

    from safetensors.torch import save_file

    from diffshield.backdoor.trojdiff import trojan_sample

    folder = tmp_path / "troj"
    shutil.copytree(tiny_ddpm_dir, folder)
    g, y = get_trigger("stop"), get_target("hat")
    mu, gamma = 0.4 * g, torch.full_like(g, 0.6)
    save_file({"trigger": g, "target": y, "mu": mu, "gamma": gamma}, str(folder / "backdoor.safetensors"))
    rep = tmp_path / "e.json"
    assert main(["backdoor", "eval", "--model", str(folder), "--trigger", "model", "--target", "model", "--n", "2",
                 "--n-clean", "0", "--steps", "2", "--json", str(rep)]) == 0
    r = json.loads(rep.read_text())
    assert r["sampling"]["scheduler"] == "trojan ddim" and r["sampling"]["x_T"] == "gamma eps(seed) + mu"
    want = backdoor_metrics(trojan_sample(load_ddpm(folder), [0, 1], mu, gamma, steps=2), (y + 1) / 2)
    assert r["mse"] == pytest.approx(want["mse"], rel=1e-5) and r["sampling"]["steps"] == 2


def test_cli_refuses_ignored_or_unusable_options_before_work(tiny_ddpm_dir, tmp_path, capsys):
    """--trigger-mask without an image-file trigger, --channels with --init and eval --n-clean 1 are refused in one
    line before anything is sampled, trained or written."""
    d, mask = str(tiny_ddpm_dir), str(tmp_path / "no_such_mask.png")
    runs = {
        "sample_box": ["backdoor", "sample", "--model", d, "--trigger", "box", "--trigger-mask", mask, "--n", "1",
                       "--scheduler", "ddim", "--steps", "1", "--out", str(tmp_path / "o1")],
        "sample_none": ["backdoor", "sample", "--model", d, "--trigger-mask", mask, "--n", "1", "--scheduler",
                        "ddim", "--steps", "1", "--out", str(tmp_path / "o2")],
        "eval_box": ["backdoor", "eval", "--model", d, "--trigger", "box", "--trigger-mask", mask, "--target",
                     "corner", "--n", "1", "--n-clean", "0", "--scheduler", "ddim", "--steps", "1", "--json",
                     str(tmp_path / "o3.json")],
        "implant_box": ["backdoor", "implant", "--model", d, "--trigger", "box", "--trigger-mask", mask,
                        "--epochs", "1", "--pool-size", "4", "--batch-size", "4", "--out", str(tmp_path / "o4")],
        "init_channels": ["backdoor", "train-ddpm", "--init", d, "--channels", "8", "16", "--steps", "1",
                          "--pool-size", "4", "--batch-size", "4", "--warmup", "0", "--out", str(tmp_path / "o5")],
        "n_clean_1": ["backdoor", "eval", "--model", d, "--trigger", "box", "--target", "corner", "--n", "1",
                      "--n-clean", "1", "--scheduler", "ddim", "--steps", "1", "--json", str(tmp_path / "o6.json")],
    }
    capsys.readouterr()
    for name, argv in runs.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert "\n" not in err, name
        key = {"init_channels": "--init", "n_clean_1": "at least 2"}.get(name, "image-file --trigger")
        assert key in err, (name, err)
    assert not any(tmp_path.glob("o*")) and not any(tmp_path.glob("o*.json"))
    with pytest.raises(DiffshieldError, match="image-file trigger only"):
        get_trigger("box", 32, mask)
    from diffshield.backdoor.ddpm import DDPMTrainConfig
    from diffshield.cli.backdoor import DEFAULT_CHANNELS

    assert DEFAULT_CHANNELS == DDPMTrainConfig().block_out_channels  # the CLI's default without --init
    from diffshield.cli.main import build_parser

    parse = build_parser().parse_args
    assert parse(["backdoor", "train-ddpm", "--out", "o", "--channels", "8", "16"]).channels == [8, 16]
    assert not getattr(parse(["backdoor", "train-ddpm", "--out", "o", "--init", d]), "channels_given", False)


def test_models_of_another_schedule_length_are_refused(tmp_path, capsys):
    """A DDPM whose scheduler has num_train_timesteps != 1000 is refused in one line by sample, eval and scan before
    any work (TERD's t_high (990, 999) and the 1000-step samplers would index past it); reverse_trigger refuses it
    too."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=100, beta_schedule="linear", clip_sample=False)
    folder = tmp_path / "short"
    DDPMModel(tiny_unet(8), sched).save(folder)
    cal = tmp_path / "cal.json"
    calibrate({"fast": [(1e9, 1e9)]}).save(cal)
    capsys.readouterr()
    for argv in (["backdoor", "sample", "--model", str(folder), "--n", "1", "--out", str(tmp_path / "s")],
                 ["backdoor", "eval", "--model", str(folder), "--trigger", "box", "--target", "corner", "--n", "1",
                  "--n-clean", "0"],
                 ["scan", "--model", str(folder), "--preset", "fast", "--calibration", str(cal)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "100-step" in err and "1000-step" in err and "\n" not in err, argv
    assert not (tmp_path / "s").exists()
    with pytest.raises(DiffshieldError, match="1000-step"):
        reverse_trigger(DDPMModel(tiny_unet(8), sched), TERDConfig(stage1_iters=1, stage2_iters=0, batch_size=2),
                        progress=False)


def test_sample_refuses_unusable_seeds_triggers_and_initial_noises():
    """sample() refuses, in one line and before sampling: no seeds, a trigger together with x_T (it would be dropped
    while the result said triggered), an x_T whose batch is not len(seeds) or whose images are not the model's, and
    NaN/inf in the trigger or x_T. A valid x_T reproduces the seeds' own draw (plus the trigger when added to it)."""
    from diffshield.backdoor.sampling import initial_noise

    model = DDPMModel(tiny_unet(8), build_scheduler()).eval()
    cfg = SampleConfig("ddim", steps=1)
    seeds, shape = [0, 1, 2, 3], model.image_shape
    g = torch.zeros(shape)
    g[:, 5:, 5:] = 1.0
    noise = initial_noise(seeds, shape)
    bad_trig, bad_x = g.clone(), noise.clone()
    bad_trig[0, 0, 0], bad_x[1, 2, 3, 4] = float("nan"), float("inf")
    cases = {
        "at least one seed": dict(seeds=[]),
        "not both": dict(trigger=g, x_T=noise),
        "x_T shape (2, 3, 8, 8)": dict(x_T=noise[:2]),
        "x_T shape (4, 3, 4, 4)": dict(x_T=noise[:, :, :4, :4]),
        "x_T shape (4, 1, 8, 8)": dict(x_T=noise[:, :1]),
        "trigger has NaN": dict(trigger=bad_trig),
        "trigger has NaN or infinite": dict(trigger=g * float("inf")),
        "x_T has NaN or infinite": dict(x_T=bad_x),
    }
    for msg, kw in cases.items():
        with pytest.raises(DiffshieldError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            sample(model, kw.pop("seeds", seeds), config=cfg, **kw)
    res = sample(model, seeds, config=cfg, x_T=noise)
    assert res.images.shape == (4, *shape) and res.seeds == seeds and not res.triggered
    torch.testing.assert_close(res.images, sample(model, seeds, config=cfg).images, rtol=0, atol=1e-5)
    torch.testing.assert_close(sample(model, seeds, config=cfg, x_T=noise + g).images,
                               sample(model, seeds, trigger=g, config=cfg).images, rtol=0, atol=1e-5)


def test_eval_grid_must_be_a_png_name(tiny_ddpm_dir, tmp_path, capsys):
    """backdoor eval --grid writes PNG data, so a --grid not ending in .png is refused in one line before any work,
    as 'diffshield eval erasure --grid' does."""
    argv = ["backdoor", "eval", "--model", str(tiny_ddpm_dir), "--trigger", "box", "--target", "corner", "--n", "1",
            "--n-clean", "0", "--scheduler", "ddim", "--steps", "1"]
    capsys.readouterr()
    assert main([*argv, "--grid", str(tmp_path / "g.jpg"), "--json", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "must end in .png" in err and "\n" not in err
    assert not any(tmp_path.iterdir())
    assert main([*argv, "--grid", str(tmp_path / "g.PNG")]) == 0 and (tmp_path / "g.PNG").exists()


def _trojdiff_folder(tiny_ddpm_dir, folder):
    """A copy of the tiny DDPM that records TrojDiff's mu and gamma (stop -> hat, gamma 0.6)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(tiny_ddpm_dir, folder)
    g = get_trigger("stop")
    save_file({"trigger": g, "target": get_target("hat"), "mu": 0.4 * g, "gamma": torch.full_like(g, 0.6)},
              str(folder / "backdoor.safetensors"))
    return str(folder)


def test_trojdiff_model_refuses_an_explicit_ddpm_scheduler(tiny_ddpm_dir, tmp_path, capsys, monkeypatch):
    """--trigger model on a TrojDiff model samples with the trojan DDIM: sample and eval refuse an explicit
    --scheduler ddpm in one line before sampling (it used to be ignored); --scheduler ddim and no --scheduler run
    the trojan DDIM, with the steps used (1000 by default) in the printed note."""
    from diffshield.backdoor import trojdiff
    from diffshield.cli.main import build_parser

    d = _trojdiff_folder(tiny_ddpm_dir, tmp_path / "troj")
    sample_argv = ["backdoor", "sample", "--model", d, "--trigger", "model", "--n", "1"]
    eval_argv = ["backdoor", "eval", "--model", d, "--trigger", "model", "--target", "model", "--n", "1",
                 "--n-clean", "0"]
    capsys.readouterr()
    for argv in ([*sample_argv, "--scheduler", "ddpm", "--steps", "1", "--out", str(tmp_path / "s1")],
                 [*eval_argv, "--scheduler", "ddpm", "--steps", "1", "--json", str(tmp_path / "e1.json")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "trojan DDIM" in err and "--scheduler ddim or leave it out" in err and "\n" not in err, err
    assert not (tmp_path / "s1").exists() and not (tmp_path / "e1.json").exists()
    assert main([*sample_argv, "--scheduler", "ddim", "--steps", "1", "--out", str(tmp_path / "s2")]) == 0
    assert "eta 0, 1 steps (--steps)" in capsys.readouterr().out
    man = json.loads((tmp_path / "s2" / "manifest.json").read_text())
    assert man["sampling"] == {"scheduler": "trojan ddim", "steps": 1}
    parse = build_parser().parse_args
    assert not getattr(parse(sample_argv + ["--out", "o"]), "scheduler_given", False)
    assert parse([*sample_argv, "--scheduler", "ddpm", "--out", "o"]).scheduler_given
    # no --scheduler, no --steps: the trojan DDIM at the default 1000 steps, and the note says so (sampling stubbed)
    seen = []

    def fake(model, seeds, mu, gamma, steps=100, batch_size=64):
        seen.append(steps)
        return torch.zeros(len(seeds), *model.image_shape)

    monkeypatch.setattr(trojdiff, "trojan_sample", fake)
    for argv in ([*sample_argv, "--out", str(tmp_path / "s3")], eval_argv):
        assert main(argv) == 0, argv
        assert "eta 0, 1000 steps (the default with --scheduler ddpm; --steps N to change)" in capsys.readouterr().out
    assert seen == [1000, 1000]
