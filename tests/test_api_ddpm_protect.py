"""Python API of the backdoor, protect and toy-world pillars used from a notebook: misuse fails early in one line
(DiffshieldError) instead of deep in torch or silently, results are JSON-ready, and callers' objects are left as
they were given (tiny models; each test well under a second or two)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffshield.backdoor.baddiffusion import BadDiffusionConfig, implant
from diffshield.backdoor.ddpm import DDPMModel, build_scheduler
from diffshield.backdoor.metrics import backdoor_metrics
from diffshield.backdoor.sampling import SampleConfig, sample
from diffshield.backdoor.terd import Calibration, TERDConfig, input_detect, kl_stats, model_verdict, reverse_trigger
from diffshield.backdoor.triggers import get_target, get_trigger
from diffshield.backdoor.trojdiff import TrojDiffConfig, trojan_sample
from diffshield.core.errors import DiffshieldError
from diffshield.protect import AttackAsDefenseConfig, EOTConfig, FFCConfig, FFCInpainterNet, FnInpainter, protect
from diffshield.protect.inpainters import ToyInpainter
from diffshield.protect.metrics import evaluate_protection


def tiny_unet(size: int = 8):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=3, out_channels=3, block_out_channels=(4, 8),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=2)


@pytest.fixture(scope="module")
def model():
    return DDPMModel(tiny_unet(8), build_scheduler()).eval()


@pytest.fixture(scope="module")
def inpainter():
    torch.manual_seed(0)
    f = ToyInpainter(FFCInpainterNet(FFCConfig(base=4, n_down=2, n_blocks=1)).eval()).eval()
    for p in f.parameters():
        p.requires_grad_(False)
    return f


def _scene(n: int = 1, side: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0))
    m = torch.zeros(n, 1, side, side)
    m[..., 6:12, 6:12] = 1
    return x, m


# ---- backdoor: sampling ----

@pytest.mark.parametrize("kw, says", [
    ({"steps": 2.5}, "steps must be a whole number"), ({"steps": "2"}, "steps must be a whole number"),
    ({"batch_size": 1.5}, "batch_size must be a whole number"), ({"batch_size": True}, "batch_size"),
])
def test_sample_config_counts_are_whole_numbers(kw, says):
    """2.5 steps failed in diffusers' indexing (IndexError) and batch_size 1.5 in range(), both only once sampling
    ran; a NumPy integer is still taken, as a Python int."""
    with pytest.raises(DiffshieldError, match=says):
        SampleConfig("ddim", **{"steps": 2, **kw})
    cfg = SampleConfig("ddim", np.int64(3), np.int64(2))
    assert type(cfg.steps) is int and type(cfg.batch_size) is int


@pytest.mark.parametrize("seeds, says", [([1.5], "whole number"), ("12", "list of whole numbers"),
                                         ([True], "whole number"), ([-1], r"\[0, 2\*\*64 - 1\]"),
                                         ([], "at least one")])
def test_sample_refuses_seeds_that_are_not_whole_numbers(model, seeds, says):
    """A float seed was truncated (1.5 drew seed 1's image), a string split into digit seeds, a negative one read
    modulo 2**64; NumPy seeds come back as Python ints, so the result's seeds serialise to JSON."""
    with pytest.raises(DiffshieldError, match=says):
        sample(model, seeds, config=SampleConfig("ddim", 1))
    res = sample(model, [np.int64(3)], config=SampleConfig("ddim", 1))
    assert type(res.seeds[0]) is int and json.dumps(res.seeds) == "[3]"


def test_sample_refuses_a_model_name_or_a_config_of_another_kind(model):
    with pytest.raises(DiffshieldError, match=r"load_ddpm\('toy:ddpm'\)"):
        sample("toy:ddpm", [0])
    with pytest.raises(DiffshieldError, match="DDPMModel"):
        sample(model.unet, [0])
    with pytest.raises(DiffshieldError, match="SampleConfig"):
        sample(model, [0], config={"scheduler": "ddim", "steps": 1})


# ---- backdoor: TERD ----

def test_model_verdict_refuses_thresholds_that_could_never_be_exceeded():
    """NaN thresholds answered "clean" for any model; a Calibration or text gave a TypeError; a negative min_move
    gave a verdict on an r that never moved."""
    from types import SimpleNamespace

    res = SimpleNamespace(mean_kl=5.0, var_kl=5.0, moved_rel=0.5)
    with pytest.raises(DiffshieldError, match="mean_kl"):
        model_verdict(res, {"mean_kl": float("nan"), "var_kl": float("nan")})
    with pytest.raises(DiffshieldError, match="mean_kl"):
        model_verdict(res, {"mean_kl": "0.1", "var_kl": 0.1})
    with pytest.raises(DiffshieldError, match=r"calibration.get\(preset\)"):
        model_verdict(res, Calibration({"cpu": {"mean_kl": 0.1, "var_kl": 0.1}}))
    unmoved = SimpleNamespace(mean_kl=0.0, var_kl=0.0, moved_rel=0.0)
    for bad in (-1.0, float("nan")):
        with pytest.raises(DiffshieldError, match="min_move"):
            model_verdict(unmoved, {"mean_kl": 0.1, "var_kl": 0.1}, bad)
    assert model_verdict(res, {"mean_kl": 0.1, "var_kl": 0.1}) == "backdoored"


def test_input_detection_refuses_numpy_arrays_in_one_line():
    r, x = -torch.rand(3, 8, 8), torch.randn(4, 3, 8, 8)
    with pytest.raises(DiffshieldError, match="noises must be a torch.Tensor"):
        input_detect(x.numpy(), r)
    with pytest.raises(DiffshieldError, match="reversed trigger r must be a torch.Tensor"):
        input_detect(x, r.numpy())
    with pytest.raises(DiffshieldError, match="torch.Tensor"):
        kl_stats(r.tolist())
    assert input_detect(x, r).shape == (4,)


def test_reverse_trigger_gives_the_model_back_as_it_was_and_refuses_other_arguments():
    """The scan left a model being fine-tuned in eval mode with every parameter frozen (its optimiser then
    silently stepped nothing); a name, a config of another method, or a truthy string for learn_gamma (which
    reversed gamma) were not refused."""
    m = DDPMModel(tiny_unet(8), build_scheduler())
    m.unet.train()
    m.unet.conv_in.requires_grad_(False)  # the caller's own mix of frozen and trainable parameters
    flags = [p.requires_grad for p in m.unet.parameters()]
    cfg = TERDConfig(stage1_iters=1, stage2_iters=1, batch_size=2, ddim_steps=2)
    a = reverse_trigger(m, cfg, progress=False)
    assert m.unet.training and [p.requires_grad for p in m.unet.parameters()] == flags
    b = reverse_trigger(m, cfg, progress=False)
    assert torch.equal(a.r, b.r) and a.mean_kl == b.mean_kl
    json.dumps(a.config)
    with pytest.raises(DiffshieldError, match="load_ddpm"):
        reverse_trigger("toy:ddpm", cfg, progress=False)
    with pytest.raises(DiffshieldError, match="TERDConfig"):
        reverse_trigger(m, BadDiffusionConfig(), progress=False)
    with pytest.raises(DiffshieldError, match="learn_gamma"):
        TERDConfig(learn_gamma="no")


# ---- backdoor: metrics, triggers, implant configs, TrojDiff ----

def test_backdoor_metrics_refuses_a_model_space_target_and_unusable_images():
    """get_target gives [-1, 1]: passed as is, the MSE and ASR were silently wrong (ASR 0 for perfect hits)."""
    y = get_target("corner", 8)
    hits = ((y + 1) / 2).expand(2, 3, 8, 8).clone()
    assert backdoor_metrics(hits, (y + 1) / 2)["asr"] == 1.0
    with pytest.raises(DiffshieldError, match=r"\(y \+ 1\) / 2"):
        backdoor_metrics(hits, y)
    with pytest.raises(DiffshieldError, match=r"\[0, 1\]"):
        backdoor_metrics(hits * 2 - 1, (y + 1) / 2)
    with pytest.raises(DiffshieldError, match="float tensor"):
        backdoor_metrics((hits * 255).to(torch.uint8), (y + 1) / 2)
    with pytest.raises(DiffshieldError, match="N >= 1"):
        backdoor_metrics(hits[:0], (y + 1) / 2)
    with pytest.raises(DiffshieldError, match="differ in shape"):
        backdoor_metrics(hits, (get_target("corner", 16) + 1) / 2)


@pytest.mark.parametrize("size, says", [(0, "at least 8"), (-3, "at least 8"), (2.5, "whole number"),
                                        (3, "at least 8")])
def test_triggers_and_targets_refuse_unusable_sizes(size, says):
    """Size 0 gave an empty trigger, -3 and 2.5 numpy/torch errors, 3 a broadcasting error for the checker."""
    for get, name in ((get_trigger, "box"), (get_trigger, "checker"), (get_target, "hat")):
        with pytest.raises(DiffshieldError, match=says):
            get(name, size)
    assert get_trigger("box", np.int64(8)).shape == (3, 8, 8)


def test_a_trigger_tensor_is_not_a_trigger_name():
    with pytest.raises(DiffshieldError, match="give it to sample"):
        get_trigger(torch.zeros(3, 8, 8))
    with pytest.raises(DiffshieldError, match="built-in name"):
        get_target(None)


@pytest.mark.parametrize("kw, says", [
    ({"grad_clip": float("nan")}, "grad_clip must be a finite number"), ({"lr": float("inf")}, "lr must be a finite"),
    ({"epochs": 1.5}, "epochs must be a whole number"), ({"batch_size": 2.5}, "batch_size must be a whole"),
    ({"seed": 1.5}, "seed must be a whole"), ({"warmup": float("nan")}, "warmup must be a whole"),
    ({"trigger": 3}, "trigger must be a built-in name"), ({"poison_rate": "0.1"}, "poison_rate must be a finite"),
])
def test_implant_configs_refuse_fields_of_the_wrong_kind(kw, says):
    """A NaN clip ran the whole fine-tune to NaN weights (refused only when saving); fractional counts failed in
    range() after the model and the image pool were loaded."""
    for cls in (BadDiffusionConfig, TrojDiffConfig):
        with pytest.raises(DiffshieldError, match=says):
            cls(**kw)


def test_implant_refuses_a_config_of_another_method_before_loading_anything(tmp_path):
    with pytest.raises(DiffshieldError, match="BadDiffusionConfig or a TrojDiffConfig"):
        implant("no/such/model", TERDConfig(), tmp_path / "out", progress=False)


def test_trojan_sample_refuses_unusable_seeds_and_trojan_noise(model):
    with pytest.raises(DiffshieldError, match="at least one seed"):
        trojan_sample(model, [], steps=1)
    with pytest.raises(DiffshieldError, match="whole number"):
        trojan_sample(model, [1.5], steps=1)
    with pytest.raises(DiffshieldError, match="mu must be"):
        trojan_sample(model, [0], mu=np.zeros((3, 8, 8), np.float32), steps=1)
    with pytest.raises(DiffshieldError, match="gamma must be"):
        trojan_sample(model, [0], mu=torch.zeros(3, 8, 8), gamma=float("nan"), steps=1)


# ---- protect ----

@pytest.mark.parametrize("kw, says", [
    ({"w_mask": float("nan")}, "w_mask must be a finite"), ({"w_hide": float("inf")}, "w_hide must be a finite"),
    ({"lr": float("nan")}, "lr must be a finite"), ({"eps": "0.1"}, "eps must be a finite"),
    ({"steps": 2.0}, "steps must be a whole"), ({"steps": True}, "steps must be a whole"),
    ({"expand": 2.5}, "expand must be a whole"), ({"seed": 1.5}, "seed must be a whole"),
    ({"quantize": "no"}, "quantize must be True or False"), ({"eot": {"samples": 2}}, "eot must be an EOTConfig"),
    ({"betas": 0.5}, "betas"),
])
def test_protect_config_refuses_values_that_failed_mid_run_or_gave_nan_images(kw, says):
    """w_mask NaN returned all-NaN protected images without an error; steps 2.0, expand 2.5 and seed 1.5 failed
    inside the optimisation; a dict as eot failed after the first inpainter call."""
    with pytest.raises(DiffshieldError, match=says):
        AttackAsDefenseConfig(**kw)


def test_eot_config_refuses_fractional_counts():
    with pytest.raises(DiffshieldError, match="samples must be a whole"):
        EOTConfig(samples=1.5)
    with pytest.raises(DiffshieldError, match="max_dilate must be a whole"):
        EOTConfig(max_dilate=2.5)
    assert EOTConfig(samples=np.int64(2)).samples == 2


def test_protect_refuses_an_inpainter_name_or_a_config_of_another_kind(inpainter):
    x, m = _scene()
    with pytest.raises(DiffshieldError, match=r"load_inpainter\('toy'\)"):
        protect("toy", x, m, AttackAsDefenseConfig(steps=1))
    with pytest.raises(DiffshieldError, match="AttackAsDefenseConfig"):
        protect(inpainter, x, m, TERDConfig())


def test_evaluate_protection_refuses_an_unknown_target_and_unusable_counts(inpainter):
    """target="invrt" silently judged the colour target; expand -1 and batch 0 failed inside torch / range()."""
    x, m = _scene()
    for kw, says in (({"target": "invrt"}, "'colour' or 'invert'"), ({"expand": -1}, "expand"),
                     ({"batch": 0}, "batch"), ({"expand": 2.5}, "expand must be a whole")):
        with pytest.raises(DiffshieldError, match=says):
            evaluate_protection(inpainter, x, x, m, partial=False, **kw)


def test_fn_inpainter_checks_its_functions_fill():
    """A 0-255 fill, a NumPy fill or one image's fill for a batch were composited silently (broadcast); a fill per
    image that broadcasts per image (one colour) is still taken."""
    x, m = _scene(2)
    for fn, says in ((lambda i, mm: i * 255, "not \\[0, 1\\]"), (lambda i, mm: i.detach().numpy(), "ndarray"),
                     (lambda i, mm: i[:1], "shape"), (lambda i, mm: i * 2 - 1, "not \\[0, 1\\]")):
        with pytest.raises(DiffshieldError, match=says):
            FnInpainter(fn)(x, m)
    green = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)
    out = FnInpainter(lambda i, mm: green.expand(i.shape[0], 3, 1, 1))(x, m)
    assert torch.equal(out[:, :, 8, 8], green[:, :, 0, 0].expand(2, 3)) and torch.equal(out[..., 0, 0], x[..., 0, 0])
    for bad in (3, None):
        with pytest.raises(DiffshieldError, match="needs a function"):
            FnInpainter(bad)
    with pytest.raises(DiffshieldError, match="multiple"):
        FnInpainter(lambda i, mm: i, multiple=0)


# ---- toy world ----

def test_detector_refuses_images_it_would_misread_and_keeps_its_mode():
    """0-255, [-1, 1] and uint8 images got confident labels; a ShapesBatch's NumPy (N, H, W, 3) array and a single
    image failed inside torch; predict left a detector in training mode switched to eval."""
    from diffshield.toyworld.detector import ConceptDetector, describe
    from diffshield.toyworld.shapes import ShapesWorld

    torch.manual_seed(0)
    det = ConceptDetector(width=4, feature_dim=8)
    batch = ShapesWorld(version=1).sample(2, seed=0)
    x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).contiguous()
    cases = [(x * 255, r"\[0, 1\]"), (x * 2 - 1, r"\[0, 1\]"), ((x * 255).to(torch.uint8), "uint8"),
             (batch.images, "permute"), (x[0], "single image"), (x[:0], "N >= 1")]
    for bad, says in cases:
        with pytest.raises(DiffshieldError, match=says):
            det.predict(bad)
    with pytest.raises(DiffshieldError, match="permute"):
        describe(det, batch.images)
    det.train()
    pred = det.predict(x)
    assert det.training and pred["shape"][0].shape == (2,)
    assert all(math.isfinite(d.confidence["shape"]) for d in describe(det, x))


def test_shapesworld_sample_refuses_negative_or_fractional_counts_and_seeds():
    """``ShapesWorld().sample(-1)`` and ``sample(4, seed=1.5)`` failed inside numpy."""
    from diffshield.toyworld.shapes import ShapesWorld

    for kw, says in ((dict(n=-1), "n >= 0"), (dict(n=2.5), "whole number"), (dict(n=2, seed=1.5), "whole number"),
                     (dict(n=2, seed=-3), "seed >= 0")):
        with pytest.raises(DiffshieldError, match=says):
            ShapesWorld().sample(**kw)
    assert len(ShapesWorld().sample(0).captions) == 0 and len(ShapesWorld().sample(2, seed=3).captions) == 2
