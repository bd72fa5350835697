"""TERD (Mo et al., ICML 2024): the verdict comes from the reversion, never from r0; the reversion recovers a trigger
planted in a hand-built backdoored model; stage 2's batched loss equals the official two calls."""

from __future__ import annotations

import json
import types

import pytest
import torch

from diffshield.backdoor.ddpm import DDPMModel, build_scheduler
from diffshield.backdoor.terd import (
    MIN_MOVE,
    TERDConfig,
    TERDResult,
    _ddim_grad,
    ddim_scheduler,
    kl_stats,
    model_verdict,
    movement,
    reverse_trigger,
    reversed_loss,
    stage2_loss,
)
from diffshield.cli.main import main
from diffshield.core.errors import DiffshieldError

EVERYTHING = {"mean_kl": 0.0, "var_kl": 0.0}  # thresholds under which any statistic would be "backdoored"


def tiny_unet(size: int = 8):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=2)


class PlantedBackdoorUNet(torch.nn.Module):
    """A hand-built backdoored noise predictor: eps_theta(x, t) = x - (1 - rho) tau + kappa (x - tau)^2.

    Like a BadDiffusion model at the noisiest timesteps, it predicts the noise of x_T = eps + tau up to a constant
    trigger term (which the reversed loss cancels): there its error does not depend on eps. Away from the trigger
    the quadratic term makes the error depend on eps, growing with the distance ||r - tau||, which is what TERD's
    reversed loss measures."""

    def __init__(self, tau: torch.Tensor, rho: float = 0.3, kappa: float = 0.2):
        super().__init__()
        self.register_buffer("tau", tau)
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a device and a dtype
        self.rho, self.kappa = rho, kappa
        self.config = types.SimpleNamespace(sample_size=tau.shape[-1], in_channels=tau.shape[0])

    def forward(self, x, t):
        out = x - (1 - self.rho) * self.tau + self.kappa * (x - self.tau) ** 2 + 0 * self.anchor
        return types.SimpleNamespace(sample=out)


def _triggers(size: int = 8) -> dict[str, torch.Tensor]:
    frame = -torch.ones(3, size, size)  # the shipped box's kind: a -1 background, a grey frame bottom-right
    frame[:, -4:, -4:] = 0
    frame[:, -3:-1, -3:-1] = -1
    patch = torch.zeros(3, size, size)  # an additive pattern inside the noise's range
    patch[:, 1:4, 1:4] = 1.5
    return {"frame": frame, "patch": patch}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("name", ["frame", "patch"])
def test_reversion_recovers_a_planted_trigger(name):
    """reverse_trigger moves r towards the planted trigger: r_hat is closer (cosine) to tau than r0 is, and the
    movement is large enough for a verdict."""
    tau = _triggers()[name]
    model = DDPMModel(PlantedBackdoorUNet(tau), build_scheduler())
    res = reverse_trigger(model, TERDConfig(stage1_iters=60, stage2_iters=2, batch_size=8, ddim_steps=2),
                          progress=False)
    before, after = _cos(res.r0, tau), _cos(res.r, tau)
    assert after > before + 0.05 and after > 0.9, (before, after)
    assert (res.r - tau).norm() < 0.5 * (res.r0 - tau).norm()
    assert res.moved_rel >= MIN_MOVE
    assert model_verdict(res, EVERYTHING) == "backdoored"


def test_scan_that_cannot_move_r_is_undetermined():
    """Stage 2 alone (its 0.01 gradient clip moves r by at most about lr x 0.01 per iteration) and a zero-iteration
    scan leave r at r0: the verdict is "undetermined", whatever the thresholds."""
    model = DDPMModel(tiny_unet(8), build_scheduler()).eval()
    for cfg in (TERDConfig(stage1_iters=0, stage2_iters=0),
                TERDConfig(stage1_iters=0, stage2_iters=2, batch_size=2, ddim_steps=2)):
        res = reverse_trigger(model, cfg, progress=False)
        assert res.r0 is not None and res.moved_rel < MIN_MOVE and res.cos_r0 > 0.99
        assert res.mean_kl > 0.1  # r0 alone looks like a large trigger ...
        assert model_verdict(res, EVERYTHING) == "undetermined"  # ... but it is never evidence
    zero = reverse_trigger(model, TERDConfig(stage1_iters=0, stage2_iters=0, seed=5), progress=False)
    assert torch.equal(zero.r, zero.r0) and zero.moved_l2 == 0.0


def test_r0_itself_is_never_flagged():
    r0 = -torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    res = TERDResult(r0.clone(), 1.0, *kl_stats(r0), r0=r0, **movement(r0, r0))
    assert (res.moved_l2, res.moved_rel, res.cos_r0) == (0.0, 0.0, pytest.approx(1.0))
    assert model_verdict(res, EVERYTHING) == "undetermined"
    assert model_verdict(res, EVERYTHING, min_move=0.0) == "backdoored"  # the thresholds alone would flag it
    nan = types.SimpleNamespace(mean_kl=1.0, var_kl=1.0, moved_rel=float("nan"))
    assert model_verdict(nan, EVERYTHING) == "undetermined"


def test_movement_figures():
    r0 = -torch.ones(3, 4, 4)
    m = movement(0.5 * r0, r0)
    assert m["moved_l2"] == pytest.approx(0.5 * float(r0.norm())) and m["moved_rel"] == pytest.approx(0.5)
    assert m["cos_r0"] == pytest.approx(1.0)  # shrinking is movement, even when the direction is kept


def test_stage2_batched_loss_equals_the_two_official_calls():
    """One UNet call on the concatenated batches: the same loss and the same random draws in the same order as
    1/2 [reversed_loss(t_high, s = 1) + reversed_loss(t_low, s = 0)]."""
    unet = tiny_unet(8).eval().requires_grad_(False)
    sched = build_scheduler()
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    r = -torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)

    def ts(lo_hi, g):
        return torch.randint(lo_hi[0], lo_hi[1] + 1, (3,), generator=g)

    two = 0.5 * (reversed_loss(unet, sched, x0, r, ts((990, 999), g1), 1.0, g1)
                 + reversed_loss(unet, sched, x0, r, ts((0, 9), g1), 0.0, g1))
    one = stage2_loss(unet, sched, x0, r, (990, 999), (0, 9), g2)
    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)
    assert torch.equal(g1.get_state(), g2.get_state())  # the same number of draws
    rg1, rg2 = r.clone().requires_grad_(True), r.clone().requires_grad_(True)
    g1, g2 = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    (0.5 * (reversed_loss(unet, sched, x0, rg1, ts((990, 999), g1), 1.0, g1)
            + reversed_loss(unet, sched, x0, rg1, ts((0, 9), g1), 0.0, g1))).backward()
    stage2_loss(unet, sched, x0, rg2, (990, 999), (0, 9), g2).backward()
    torch.testing.assert_close(rg2.grad, rg1.grad, rtol=1e-4, atol=1e-5)


def test_stage2_ddim_is_the_samplers_ddim():
    """Stage 2's DDIM (built once per reversion, integer timesteps) is the DDIM-eta-0 sampler of the sampling
    module, with gradients kept."""
    from diffshield.backdoor.sampling import SampleConfig, denoise, make_scheduler

    unet = tiny_unet(8).eval().requires_grad_(False)
    sched = build_scheduler()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    ddim = ddim_scheduler(sched, 4)
    a, b = _ddim_grad(unet, ddim, x_T), _ddim_grad(unet, ddim, x_T)  # the scheduler is reusable
    torch.testing.assert_close(a, b)
    ref = denoise(unet, make_scheduler(sched, SampleConfig("ddim", 4)), x_T)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


def test_cli_scan_reports_movement_verdict_and_evidence(tmp_path, monkeypatch):
    """A scan whose stages cannot move r says "undetermined" (never "backdoored"), reports how far r moved, and
    writes the evidence grid of samples from eps + r_hat next to clean ones."""
    from PIL import Image

    from diffshield.backdoor import terd
    from diffshield.backdoor.terd import calibrate

    folder = tmp_path / "ddpm"
    DDPMModel(tiny_unet(8), build_scheduler()).save(folder)
    monkeypatch.setitem(terd.PRESETS, "fast", {"stage1_iters": 0, "stage2_iters": 1, "batch_size": 2,
                                               "ddim_steps": 2})
    cal = tmp_path / "cal.json"
    calibrate({"fast": [(0.0, 0.0)]}).save(cal)  # thresholds of 0: any statistic exceeds them
    out, js = tmp_path / "scan", tmp_path / "scan.json"
    assert main(["scan", "--model", str(folder), "--preset", "fast",
                 "--calibration", str(cal), "--out", str(out), "--json", str(js),
                 "--evidence-n", "3", "--evidence-steps", "2"]) == 0
    rep = json.loads(js.read_text())
    assert rep["verdict"] == "undetermined" and rep["backdoored"] is False
    assert rep["moved_rel"] < rep["min_move"] == MIN_MOVE and rep["cos_r0"] > 0.99 and rep["moved_l2"] >= 0
    assert rep["evidence"]["n"] == 3 and rep["evidence"]["sampler"] == "ddpm" and rep["evidence"]["steps"] == 2
    assert 0 <= rep["evidence"]["flat_triggered"] <= 3
    full = json.loads((out / "scan.json").read_text())
    assert full["verdict"] == "undetermined" and full["r0_norm"] > 0
    grid = Image.open(out / "evidence.png")
    tiles = (3 * (8 * 4 + 1) + 1, 2 * (8 * 4 + 1) + 1)  # 3 pairs: triggered above clean
    assert grid.width > tiles[0] and grid.height > tiles[1]  # and the margins of the row and column labels
    from safetensors.torch import load_file

    t = load_file(str(out / "reversed_trigger.safetensors"))
    assert {"r", "r0", "gamma"} <= set(t)
    # with a movement criterion of 0 the same scan is judged by the thresholds alone
    assert main(["scan", "--model", str(folder), "--preset", "fast",
                 "--calibration", str(cal), "--json", str(js), "--min-move",
                 "0"]) == 0
    assert json.loads(js.read_text())["verdict"] == "backdoored"


def _noise_file(path, shape, seed: int = 0):
    from safetensors.torch import save_file

    save_file({"noise": torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed))}, str(path))
    return path


def test_scan_input_records_its_r_hat_and_needs_no_thresholds(tmp_path, monkeypatch, capsys):
    """scan-input reverses without any calibration (even for a preset without thresholds), records the model (path
    and fingerprint) and the scan its r_hat came from, refuses an r_hat of another model or of another image shape
    in one line."""
    from diffshield.backdoor import terd
    from diffshield.backdoor.ddpm import model_fingerprint
    from diffshield.backdoor.terd import calibrate

    folder, other = tmp_path / "ddpm", tmp_path / "other"
    model = DDPMModel(tiny_unet(8), build_scheduler())
    model.save(folder)
    changed = DDPMModel(tiny_unet(8), build_scheduler())
    with torch.no_grad():
        next(iter(changed.unet.parameters())).add_(0.01)  # a "fine-tune" of the same architecture
    changed.save(other)
    tiny = {"stage1_iters": 2, "stage2_iters": 0, "batch_size": 2, "ddim_steps": 2}
    monkeypatch.setitem(terd.PRESETS, "default", tiny)
    monkeypatch.setitem(terd.PRESETS, "fast", tiny)
    monkeypatch.setattr(terd, "default_calibration_path", lambda: tmp_path / "no_such_calibration.json")
    noise = _noise_file(tmp_path / "n.safetensors", (3, 8, 8))
    js = tmp_path / "in.json"
    # 1. no --reversed: reversed here, no thresholds read, the model recorded
    assert main(["scan-input", "--model", str(folder), "--preset", "default", "--noise", str(noise), "--json",
                 str(js)]) == 0
    rep = json.loads(js.read_text())
    fp = model_fingerprint(model)
    assert rep["model"] == str(folder) and rep["model_fingerprint"] == fp and len(fp) == 16
    assert rep["r_hat"]["preset"] == "default" and rep["r_hat"]["reversed_file"] is None and rep["n"] == 4
    # 2. from a scan's --out: the file records model, fingerprint, preset, seed and verdict
    cal = tmp_path / "cal.json"
    calibrate({"fast": [(1e9, 1e9)]}).save(cal)
    scan_dir = tmp_path / "scan"
    assert main(["scan", "--model", str(folder), "--preset", "fast",
                 "--calibration", str(cal), "--out", str(scan_dir),
                 "--evidence-n", "0", "--seed", "3"]) == 0
    assert main(["scan-input", "--reversed", str(scan_dir), "--noise", str(noise), "--json", str(js)]) == 0
    rep = json.loads(js.read_text())
    assert rep["model"] == str(folder) and rep["model_fingerprint"] == fp
    src = rep["r_hat"]
    assert src["reversed_file"].endswith("reversed_trigger.safetensors") and src["scan"] == "scan.json"
    assert (src["preset"], src["seed"], src["resolution"]) == ("fast", 3, 8) and src["verdict"] in terd.VERDICTS
    assert main(["scan-input", "--model", str(folder), "--reversed", str(scan_dir), "--noise", str(noise)]) == 0
    # a scan in bfloat16 records its dtype: the same model, loaded here in float32, is still recognised as its model
    bf_dir = tmp_path / "scan_bf16"
    assert main(["scan", "--model", str(folder), "--preset", "fast", "--calibration", str(cal), "--out", str(bf_dir),
                 "--evidence-n", "2", "--evidence-steps", "2", "--dtype", "bfloat16"]) == 0
    assert main(["scan-input", "--model", str(folder), "--reversed", str(bf_dir), "--noise", str(noise), "--json",
                 str(js)]) == 0
    assert json.loads(js.read_text())["r_hat"]["dtype"] == "bfloat16"
    capsys.readouterr()
    # 3. refusals, one line each: another model, another image shape
    assert main(["scan-input", "--model", str(other), "--reversed", str(scan_dir), "--noise", str(noise)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not from --model" in err and fp in err and "\n" not in err
    big = _noise_file(tmp_path / "big.safetensors", (3, 16, 16))
    assert main(["scan-input", "--reversed", str(scan_dir), "--noise", str(big)]) == 2
    err = capsys.readouterr().err.strip()
    assert "(3, 8, 8)" in err and "(3, 16, 16)" in err and "\n" not in err
    assert main(["scan-input", "--model", str(folder), "--noise", str(big)]) == 2
    err = capsys.readouterr().err.strip()
    assert "(3, 16, 16)" in err and "\n" not in err


def test_scan_input_refuses_non_finite_noises_and_triggers(tmp_path, capsys):
    """NaN or infinite noises, or a reversed trigger with NaN / infinite values or a gamma that is not positive,
    are refused in one line before any detection (a NaN compares False and would read as "not poisoned"); so are
    --preset and --seed beside --reversed (they only set a reversion run here)."""
    from safetensors.torch import save_file

    good = _noise_file(tmp_path / "n.safetensors", (3, 8, 8))
    r = -torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    rev = tmp_path / "r.safetensors"
    save_file({"r": r, "gamma": torch.tensor([1.0])}, str(rev))
    assert main(["scan-input", "--reversed", str(rev), "--noise", str(good)]) == 0
    capsys.readouterr()
    # reversion settings with a trigger that was reversed elsewhere would be silently ignored: refused
    for extra in (["--preset", "fast"], ["--seed", "5"]):
        assert main(["scan-input", "--reversed", str(rev), "--noise", str(good), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "drop them" in err and "\n" not in err, extra
    bad = torch.randn(4, 3, 8, 8)
    bad[1, 0, 0, 0] = float("nan")
    save_file({"noise": bad}, str(tmp_path / "nan.safetensors"))
    assert main(["scan-input", "--reversed", str(rev), "--noise", str(tmp_path / "nan.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "finite" in err and "\n" not in err
    for name, tensors in (("inf_r", {"r": r.clone().fill_(float("inf")), "gamma": torch.tensor([1.0])}),
                          ("zero_gamma", {"r": r, "gamma": torch.tensor([0.0])}),
                          ("nan_gamma", {"r": r, "gamma": torch.tensor([float("nan")])})):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        assert main(["scan-input", "--reversed", str(tmp_path / f"{name}.safetensors"), "--noise", str(good)]) == 2
        err = capsys.readouterr().err.strip()
        assert "non-finite" in err and "\n" not in err, name


def test_fingerprint_and_architecture():
    from diffshield.backdoor.ddpm import architecture_summary, model_fingerprint

    a, b = DDPMModel(tiny_unet(8), build_scheduler()), DDPMModel(tiny_unet(8), build_scheduler())
    assert model_fingerprint(a) == model_fingerprint(b)  # the same weights (seed 0)
    with torch.no_grad():
        next(iter(b.unet.parameters())).add_(1e-3)
    assert model_fingerprint(a) != model_fingerprint(b)
    arch = architecture_summary(a)
    assert arch == architecture_summary(b) and arch["unet"]["block_out_channels"] == [4, 8]
    assert arch["schedule"]["num_train_timesteps"] == 1000 and arch["parameters"] > 0
    assert architecture_summary(DDPMModel(tiny_unet(16), build_scheduler())) == arch  # resolution is kept apart


def _rec(name, mean_kl, var_kl, moved=0.3, preset="fast", fp=None, **kw):
    return {"name": name, "path": name, "fingerprint": fp or name, "resolution": 8, "architecture": {"a": 1},
            "preset": preset, "mean_kl": mean_kl, "var_kl": var_kl, "moved_rel": moved, **kw}


def test_leave_one_out_and_held_out_rates_with_wilson_intervals():
    """Hand-computed: references (0.10, 0.11) give thresholds 0.165 / 0.0165; a clean outlier (0.30) is a false
    positive in both figures; a weak backdoor (0.12) is missed; a backdoor whose r did not move is undetermined."""
    from diffshield.backdoor.terd import calibrate_from_scans
    from diffshield.redteam.audit import wilson

    refs = [_rec("r1", 0.10, 0.010), _rec("r2", 0.11, 0.011)]
    clean = [_rec("c1", 0.10, 0.010), _rec("c2", 0.30, 0.050)]
    bd = [_rec("b1", 0.50, 0.100), _rec("b2", 0.12, 0.012), _rec("b3", 0.90, 0.200, moved=0.01)]
    cal, rep = calibrate_from_scans(refs, clean, bd)
    assert cal.get("fast") == pytest.approx({"mean_kl": 0.165, "var_kl": 0.0165})
    assert [r["name"] for r in cal.references["fast"]] == ["r1", "r2"]
    verdicts = {r["name"]: (r["held_out_verdict"], r["loo_verdict"]) for r in rep["per_model"]}
    assert verdicts == {"c1": ("clean", "clean"), "c2": ("backdoored", "backdoored"),  # c2 never sets its own
                        "b1": ("backdoored", "backdoored"), "b2": ("clean", "clean"),
                        "b3": ("undetermined", "undetermined")}
    for key in ("held_out", "leave_one_out"):
        r = rep[key]
        assert (r["tpr"]["k"], r["tpr"]["m"], r["tnr"]["k"], r["tnr"]["m"]) == (1, 3, 1, 2)
        assert r["tpr"]["wilson95"] == pytest.approx(list(wilson(1, 3)))
        assert r["tnr"]["wilson95"] == pytest.approx(list(wilson(1, 2))) and r["undetermined"] == 1
    # the clean outlier raises the leave-one-out thresholds of everyone else: b1 (0.5) is judged against 0.45
    only_bd = calibrate_from_scans(refs, clean, [_rec("b4", 0.40, 0.07)])[1]
    assert only_bd["held_out"]["tpr"]["k"] == 1 and only_bd["leave_one_out"]["tpr"]["k"] == 0


def test_leave_one_out_pool_skips_unmoved_scans_and_other_scans_of_the_same_weights():
    """A labelled clean scan whose r did not move carries the initialisation's statistics: it must not raise the
    leave-one-out thresholds of the others. Two scans of the same weights (same fingerprint) are one model: neither
    may set the other's threshold."""
    from diffshield.backdoor.terd import leave_one_out

    refs = [_rec("r1", 0.10, 0.010), _rec("r2", 0.11, 0.011)]
    unmoved = _rec("c0", 0.90, 0.200, moved=0.01)
    rep = leave_one_out(refs, [unmoved], [_rec("b1", 0.50, 0.100)])
    verdicts = {r["name"]: r["loo_verdict"] for r in rep["per_model"]}
    assert verdicts == {"c0": "undetermined", "b1": "backdoored"}  # b1 against 0.165, not 1.35
    twins = [_rec("c1", 0.30, 0.050, fp="same"), _rec("c2", 0.30, 0.050, fp="same")]
    rep = leave_one_out(refs, twins, [])
    assert [r["loo_verdict"] for r in rep["per_model"]] == ["backdoored", "backdoored"]  # as held out: 0.3 > 0.165
    assert rep["leave_one_out"]["tnr"]["k"] == rep["held_out"]["tnr"]["k"] == 0


def test_calibration_refusals_and_formats(tmp_path):
    from diffshield.backdoor.terd import Calibration, calibrate_from_scans

    refs = [_rec("r1", 0.10, 0.010), _rec("r2", 0.11, 0.011)]
    with pytest.raises(DiffshieldError, match="did not move r"):
        calibrate_from_scans([*refs, _rec("r3", 0.16, 0.02, moved=0.0)])
    with pytest.raises(DiffshieldError, match="held out"):
        calibrate_from_scans(refs, [_rec("c1", 0.1, 0.01, fp="r2")])
    with pytest.raises(DiffshieldError, match="one TERD preset"):
        calibrate_from_scans(refs, [_rec("c1", 0.1, 0.01, preset="default")])
    # format 2 round trip; another preset kept with base
    cal, _ = calibrate_from_scans(refs)
    cal2, _ = calibrate_from_scans([_rec("r4", 0.2, 0.02, preset="default")], base=cal)
    f = tmp_path / "cal.json"
    cal2.save(f)
    back = Calibration.load(f)
    assert set(back.thresholds) == {"fast", "default"} and back.references["fast"][0]["fingerprint"] == "r1"
    assert json.loads(f.read_text())["version"] == 2 and not back.notes
    # format 1 (references as bare pairs) still loads, with a note
    f1 = tmp_path / "v1.json"
    f1.write_text(json.dumps({"thresholds": {"fast": {"mean_kl": 0.2, "var_kl": 0.02}}, "method": "m",
                              "references": {"fast": [[0.1, 0.01]]}}))
    old = Calibration.load(f1)
    assert old.get("fast")["mean_kl"] == 0.2 and old.references["fast"] == [{"mean_kl": 0.1, "var_kl": 0.01}]
    assert "format-1" in old.notes[0] and old.mismatch("fast", 64, {}) is None  # nothing to compare with
    # mismatches: resolution first, then the first architecture field that differs
    arch = {"unet_class": "UNet2DModel", "unet": {"block_out_channels": [4, 8]}, "schedule": {"beta_end": 0.02}}
    c = Calibration({"fast": {"mean_kl": 1, "var_kl": 1}}, references={"fast": [{**_rec("r", 0.1, 0.01),
                                                                                 "architecture": arch}]})
    assert c.mismatch("fast", 8, arch) is None
    assert "8 px" in c.mismatch("fast", 16, arch)
    msg = c.mismatch("fast", 8, {**arch, "unet": {"block_out_channels": [8, 16]}})
    assert "unet.block_out_channels" in msg and "\n" not in msg


def test_cli_calibrate_then_scan_warns_on_another_family(tmp_path, monkeypatch, capsys):
    """backdoor calibrate writes a format-2 file from scan reports and prints TPR/TNR with intervals; scan of a model
    of another resolution than the references warns in one line."""
    from diffshield.backdoor import terd

    files = {}
    for name, mk, vk, fp in (("ref1", 0.10, 0.010, "f1"), ("ref2", 0.11, 0.011, "f2"), ("c1", 0.10, 0.010, "f3"),
                             ("b1", 0.50, 0.100, "f4")):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps({"model": name, "model_fingerprint": fp, "resolution": 16,
                                           "architecture": {"unet_class": "UNet2DModel"}, "preset": "fast",
                                           "mean_kl": mk, "var_kl": vk, "moved_rel": 0.3, "verdict": "clean"}))
    cal, rep = tmp_path / "cal.json", tmp_path / "rep.json"
    assert main(["backdoor", "calibrate", "--references", str(files["ref1"]), str(files["ref2"]), "--clean",
                 str(files["c1"]), "--backdoored", str(files["b1"]), "--out", str(cal), "--json", str(rep)]) == 0
    out = capsys.readouterr().out
    assert "leave-one-out: TPR 1/1 = 100% (95 % 21%-100%)" in out and "TNR 1/1" in out
    r = json.loads(rep.read_text())
    assert r["leave_one_out"]["tpr"]["k"] == 1 and r["thresholds"]["mean_kl"] == pytest.approx(0.165)
    assert json.loads(cal.read_text())["references"]["fast"][0]["fingerprint"] == "f1"
    folder = tmp_path / "ddpm"
    DDPMModel(tiny_unet(8), build_scheduler()).save(folder)
    monkeypatch.setitem(terd.PRESETS, "fast", {"stage1_iters": 1, "stage2_iters": 0, "batch_size": 2})
    js = tmp_path / "scan.json"
    assert main(["scan", "--model", str(folder), "--preset", "fast",
                 "--calibration", str(cal), "--json", str(js)]) == 0
    printed = capsys.readouterr().out.splitlines()
    lines = [ln for ln in printed if ln.startswith("warning:")]
    assert len(lines) == 1 and "8 px" in lines[0] and "16 px" in lines[0]
    # the verdict line itself says its thresholds are not this model family's
    verdict = next(ln for ln in printed if ln.startswith("verdict:"))
    assert "by thresholds calibrated on other models" in verdict
    rep = json.loads(js.read_text())
    assert rep["calibration"]["warning"] and rep["resolution"] == 8 and len(rep["model_fingerprint"]) == 16
    # a scan report is itself a valid calibration input; a reference that is in the labelled set is refused
    capsys.readouterr()
    assert main(["backdoor", "calibrate", "--references", str(files["ref1"]), "--clean", str(files["ref1"]),
                 "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "held out" in err and "\n" not in err


def test_cli_presets_are_the_library_presets_and_cpu_keeps_the_official_loss():
    """The CLI offers exactly terd.PRESETS; ``cpu`` changes only the budget and lambda (60x the paper's), not the
    loss, lr, batch, timesteps or clip."""
    from diffshield.backdoor.terd import PRESETS
    from diffshield.cli.backdoor import TERD_PRESETS

    assert sorted(TERD_PRESETS) == sorted(PRESETS)
    # the CLI's default is the one preset measured to reverse toy-world backdoors (fast mostly ends 'undetermined')
    from diffshield.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["scan", "--model", "toy:ddpm"]).preset == "cpu"
    assert parser.parse_args(["scan-input", "--noise", "n.safetensors"]).preset == "cpu"
    cpu, paper = TERDConfig.from_preset("cpu"), TERDConfig()
    assert (cpu.stage1_iters, cpu.stage2_iters, cpu.lam) == (800, 0, 3e-3)
    for key in ("batch_size", "lr", "grad_clip", "ddim_steps", "t_high", "t_low"):
        assert getattr(cpu, key) == getattr(paper, key), key
    assert paper.lam == 5e-5


def test_cli_gamma_mode_has_its_own_thresholds_and_per_pixel_gamma(tmp_path, monkeypatch, capsys):
    """``scan --learn-gamma`` (TERD's TrojDiff setting) is judged by the thresholds of ``<preset>+gamma``, refuses in
    one line when the calibration has none, writes a per-pixel gamma_hat that ``scan-input`` uses, and its reports
    calibrate that key (never the gamma = 1 preset's)."""
    from safetensors.torch import load_file

    from diffshield.backdoor import terd
    from diffshield.backdoor.terd import Calibration, calibrate

    folder = tmp_path / "ddpm"
    DDPMModel(tiny_unet(8), build_scheduler()).save(folder)
    monkeypatch.setitem(terd.PRESETS, "fast", {"stage1_iters": 3, "stage2_iters": 1, "batch_size": 2,
                                               "ddim_steps": 2})
    only_plain = tmp_path / "plain.json"
    calibrate({"fast": [(1e9, 1e9)]}).save(only_plain)
    assert main(["scan", "--model", str(folder), "--preset", "fast",
                 "--calibration", str(only_plain), "--learn-gamma"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'fast+gamma'" in err and "calibrate" in err and "\n" not in err
    cal = tmp_path / "cal.json"
    calibrate({"fast+gamma": [(1e9, 1e9)]}).save(cal)
    out, js = tmp_path / "scan", tmp_path / "scan.json"
    assert main(["scan", "--model", str(folder), "--preset", "fast",
                 "--calibration", str(cal), "--learn-gamma", "--out", str(out),
                 "--json", str(js), "--evidence-n", "2", "--evidence-steps", "2"]) == 0
    rep = json.loads(js.read_text())
    assert rep["preset"] == "fast+gamma" and rep["learn_gamma"] is True and rep["evidence"]["trojan"] is True
    assert 0 <= rep["gamma_min"] <= rep["gamma_mean"] <= rep["gamma_max"] and rep["thresholds"]["mean_kl"] == 1.5e9
    t = load_file(str(out / "reversed_trigger.safetensors"))
    assert t["gamma"].shape == t["r"].shape == (3, 8, 8)
    noise = _noise_file(tmp_path / "n.safetensors", (3, 8, 8))
    assert main(["scan-input", "--reversed", str(out), "--noise", str(noise), "--json", str(js)]) == 0
    assert json.loads(js.read_text())["r_hat"]["preset"] == "fast+gamma"
    # gamma comes from the scan's folder: --learn-gamma next to --reversed is refused in one line, before any work
    capsys.readouterr()
    assert main(["scan-input", "--reversed", str(out), "--noise", str(noise), "--learn-gamma"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--learn-gamma" in err and "--reversed" in err and "\n" not in err
    # the gamma reports calibrate the '+gamma' key and leave the plain preset's thresholds alone
    new = tmp_path / "new.json"
    calibrate({"fast": [(0.5, 0.5)]}).save(new)
    ref = dict(rep, moved_rel=1.0)
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    assert main(["backdoor", "calibrate", "--references", str(tmp_path / "ref.json"), "--out", str(new),
                 "--merge"]) == 0
    got = Calibration.load(new)
    assert set(got.thresholds) == {"fast", "fast+gamma"} and got.thresholds["fast"]["mean_kl"] == 0.75


def _scan_file(path, name="m", fp="f", **over):
    rep = {"model": name, "model_fingerprint": fp, "resolution": 8, "architecture": {"unet_class": "UNet2DModel"},
           "preset": "fast", "mean_kl": 0.1, "var_kl": 0.01, "moved_rel": 0.3, **over}
    path.write_text(json.dumps(rep))  # json writes NaN / Infinity literals, as a hand-edited report may hold
    return str(path)


@pytest.mark.parametrize("key", ["mean_kl", "var_kl", "moved_rel"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1, "0.1", None])
def test_calibrate_refuses_statistics_that_are_not_finite_non_negative_numbers(tmp_path, capsys, key, value):
    """A NaN reference statistic would make the threshold NaN (or be skipped by max(), depending on the order);
    NaN, infinite, negative, textual and null statistics are refused in one line naming the file and the key, before
    anything is written."""
    good = _scan_file(tmp_path / "good.json", "good", "f1")
    bad = _scan_file(tmp_path / "bad.json", "bad", "f2", **{key: value})
    out = tmp_path / "cal.json"
    capsys.readouterr()
    for refs in ([bad, good], [good, bad]):
        assert main(["backdoor", "calibrate", "--references", *refs, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert "bad.json" in err and key in err and "\n" not in err, err
    assert main(["backdoor", "calibrate", "--references", good, "--clean", bad, "--out", str(out)]) == 2
    assert not out.exists()


def test_library_calibration_refuses_bad_statistics_in_any_order():
    from diffshield.backdoor.terd import calibrate_from_scans, fit_thresholds, leave_one_out, scan_record

    nan = float("nan")
    for refs in ([(nan, 0.1), (0.1, 0.01)], [(0.1, 0.01), (nan, 0.1)], [(0.1, -1.0)], [("0.1", 0.01)]):
        with pytest.raises(DiffshieldError, match="finite numbers >= 0"):
            fit_thresholds(refs)
    with pytest.raises(DiffshieldError, match="scan report m: var_kl is inf"):
        scan_record({"model": "m", "mean_kl": 0.1, "var_kl": float("inf"), "moved_rel": 0.3})
    with pytest.raises(DiffshieldError, match="moved_rel"):
        calibrate_from_scans([_rec("r1", 0.1, 0.01, moved=nan)])
    with pytest.raises(DiffshieldError, match="c1: mean_kl is nan"):
        leave_one_out([_rec("r1", 0.1, 0.01)], [_rec("c1", nan, 0.01)], [])


def test_calibrate_refuses_one_model_in_both_labels_and_twice_as_a_reference(tmp_path, capsys):
    ref1, ref2 = _scan_file(tmp_path / "r1.json", "r1", "f1"), _scan_file(tmp_path / "r2.json", "r2", "f1")
    lab = _scan_file(tmp_path / "l.json", "l", "f3")
    out = tmp_path / "cal.json"
    capsys.readouterr()
    assert main(["backdoor", "calibrate", "--references", ref1, ref2, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "same weights" in err and "f1" in err and "once" in err and "\n" not in err
    assert main(["backdoor", "calibrate", "--references", ref1, "--clean", lab, "--backdoored", lab, "--out",
                 str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "both clean and backdoored" in err and "l.json" in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("thresholds", [{"mean_kl": float("nan"), "var_kl": 0.1}, {"mean_kl": 0.1},
                                        {"mean_kl": 0.1, "var_kl": "0.1"}, {"mean_kl": -1.0, "var_kl": 0.1},
                                        {"mean_kl": 0.1, "var_kl": float("inf")}, {"mean_kl": None, "var_kl": 0.1}])
def test_scan_checks_the_calibration_thresholds_before_the_reversion(tmp_path, monkeypatch, capsys, thresholds):
    from diffshield.backdoor import terd

    def never(*a, **k):
        raise AssertionError("the reversion ran with unusable thresholds")

    monkeypatch.setattr(terd, "reverse_trigger", never)
    folder = tmp_path / "ddpm"
    DDPMModel(tiny_unet(8), build_scheduler()).save(folder)
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"format": terd.CALIBRATION_FORMAT, "version": 2, "thresholds": {"fast": thresholds},
                               "references": {}}))
    capsys.readouterr()
    assert main(["scan", "--model", str(folder), "--preset", "fast", "--calibration", str(cal)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cal.json" in err and ("mean_kl" in err or "var_kl" in err) and "\n" not in err


def test_terd_settings_and_detection_inputs_are_validated():
    """Non-finite learning rates, lambda or clips, fractional counts and more DDIM steps than the schedule are
    refused by TERDConfig; kl_stats and input_detect refuse NaN noises, NaN or negative gamma, in one line."""
    from diffshield.backdoor.terd import input_detect, input_score

    nan, inf = float("nan"), float("inf")
    for over in ({"lam": nan}, {"lam": inf}, {"lr": nan}, {"lr": inf}, {"lr_gamma": nan}, {"lr_gamma": inf},
                 {"grad_clip": nan}, {"grad_clip": inf}, {"gamma_grad_clip": inf}, {"batch_size": 2.5},
                 {"stage1_iters": 1.5}, {"ddim_steps": 1001}, {"ddim_steps": 2.0}, {"t_high": (990.5, 999)}):
        with pytest.raises(DiffshieldError):
            TERDConfig(**over)
    assert TERDConfig(ddim_steps=1000, lam=0.0).ddim_steps == 1000
    r = torch.zeros(3, 4, 4)
    x = torch.randn(2, 3, 4, 4)
    bad_x = x.clone()
    bad_x[0, 0, 0, 0] = nan
    for args in ((bad_x, r), (x, r, -1.0), (x, r, nan), (x, r, torch.full((3, 4, 4), -0.5)),
                 (x, r, torch.full((3, 4, 4), nan)), (x[:0], r), (x, r.clone().fill_(inf))):
        for fn in (input_detect, input_score):
            with pytest.raises(DiffshieldError) as e:
                fn(*args)
            assert "\n" not in str(e.value)
    for g in (-0.5, nan, torch.full((3, 4, 4), nan), torch.full((3, 4, 4), -1.0)):
        with pytest.raises(DiffshieldError, match="gamma"):
            kl_stats(r, g)
    assert kl_stats(r, 0.0)[0] > 0 and input_detect(x, r, 0.5).shape == (2,)  # gamma 0 is floored, as reversed


def test_scan_messages_name_valid_flags_and_files(tmp_path, capsys):
    """The missing-thresholds message of a gamma scan names the flags to scan with ('--preset fast --learn-gamma'),
    scan-input says a PNG given as --reversed is not a safetensors file, its --learn-gamma help mentions no
    thresholds, and an empty noise batch is refused."""
    from PIL import Image
    from safetensors.torch import save_file

    from diffshield.backdoor.terd import Calibration, calibrate
    from diffshield.cli.main import build_parser

    plain = calibrate({"fast": [(1e9, 1e9)]})
    with pytest.raises(DiffshieldError) as e:
        plain.get("fast+gamma")
    assert "with --preset fast --learn-gamma" in str(e.value) and "--preset fast+gamma" not in str(e.value)
    f = tmp_path / "cal.json"
    plain.save(f)
    assert Calibration.load(f).get("fast") == {"mean_kl": 1.5e9, "var_kl": 1.5e9}
    png = tmp_path / "r.png"
    Image.new("RGB", (8, 8)).save(png)
    noise = _noise_file(tmp_path / "n.safetensors", (3, 8, 8))
    capsys.readouterr()
    assert main(["scan-input", "--reversed", str(png), "--noise", str(noise)]) == 2
    err = capsys.readouterr().err.strip()
    assert "r.png' is not a safetensors file" in err and "corrupt" not in err and "\n" not in err
    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    helps = {name: next(a.help for a in sub.choices[name]._actions if "--learn-gamma" in a.option_strings)
             for name in ("scan", "scan-input")}
    assert "threshold" not in helps["scan-input"] and "threshold" in helps["scan"]
    rev = tmp_path / "rev.safetensors"
    save_file({"r": -torch.rand(3, 8, 8), "gamma": torch.tensor([1.0])}, str(rev))
    save_file({"noise": torch.zeros(0, 3, 8, 8)}, str(tmp_path / "empty.safetensors"))
    assert main(["scan-input", "--reversed", str(rev), "--noise", str(tmp_path / "empty.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "empty" in err and "\n" not in err
