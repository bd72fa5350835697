"""Attack as Defense, the inpainter interface and protection metrics (fast; tiny models and images)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffshield.core.errors import DiffshieldError
from diffshield.protect import (
    AttackAsDefenseConfig,
    EOTConfig,
    FFCConfig,
    FFCInpainterNet,
    FnInpainter,
    expand_mask,
    load_inpainter,
    masked_mse,
    protect,
    ring_mask,
    target_colour,
)
from diffshield.protect.inpainters import ToyInpainter
from diffshield.protect.metrics import evaluate_protection, psnr, success, target_fraction
from diffshield.protect.robust import jpeg_roundtrip, resize_roundtrip, sample_transform, uint8_roundtrip
from diffshield.protect.scenes import benign_masks, make_scenes, partial_masks, protected_masks, training_masks


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    net = FFCInpainterNet(FFCConfig(base=4, n_down=2, n_blocks=1)).eval()
    f = ToyInpainter(net).eval()
    for p in f.parameters():
        p.requires_grad_(False)
    return f


def _mask(n: int, h: int, w: int) -> torch.Tensor:
    m = torch.zeros(n, 1, h, w)
    m[:, :, h // 4:h // 2, w // 4:w // 2] = 1
    return m


def test_target_colour_rule():
    grey = torch.full((1, 3, 8, 8), 0.5)
    red = torch.tensor([0.9, 0.1, 0.1])[None, :, None, None].expand(1, 3, 8, 8)
    green = torch.tensor([0.1, 0.9, 0.1])[None, :, None, None].expand(1, 3, 8, 8)
    blue = torch.tensor([0.1, 0.1, 0.9])[None, :, None, None].expand(1, 3, 8, 8)
    yellow = torch.tensor([0.9, 0.9, 0.1])[None, :, None, None].expand(1, 3, 8, 8)
    got = target_colour(torch.cat([grey, red, green, blue, yellow])).tolist()
    # grey: all three equally far -> the first (green); red-dominant: green and blue tie -> green;
    # green-dominant: red and blue tie -> red; blue-dominant: green; yellow: blue
    assert got == [[0, 1, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]


def test_masked_mse_empty_mask_is_zero_not_nan():
    a = torch.rand(2, 3, 8, 8, requires_grad=True)
    m = torch.zeros(2, 1, 8, 8)
    m[1, :, :2, :2] = 1
    v = masked_mse(a, torch.zeros_like(a), m)
    assert v[0].item() == 0.0 and not torch.isnan(v).any()
    assert torch.isclose(v[1], (a[1, :, :2, :2] ** 2).mean())
    v.sum().backward()
    assert torch.isfinite(a.grad).all()


def test_expand_and_ring_masks():
    m = torch.zeros(1, 1, 40, 40)
    m[0, 0, 20, 20] = 1
    me = expand_mask(m)  # 17x17 square around the pixel
    assert me.sum() == 17 * 17 and me[0, 0, 12, 12] == 1 and me[0, 0, 11, 20] == 0
    mr = ring_mask(m, me)
    assert mr.sum() == 17 * 17 - 1 and mr[0, 0, 20, 20] == 0


def test_protect_respects_eps_any_size_and_is_uint8(tiny):
    torch.manual_seed(1)
    x = (torch.rand(2, 3, 30, 37) * 255).round() / 255  # not a multiple of 8
    m = _mask(2, 30, 37)
    res = protect(tiny, x, m, AttackAsDefenseConfig(steps=3))
    assert res.protected.shape == x.shape
    assert res.delta.abs().max() <= 0.025 + 1e-6
    assert torch.allclose(res.protected * 255, (res.protected * 255).round(), atol=1e-3)
    assert res.protected.min() >= 0 and res.protected.max() <= 1
    assert len(res.losses) == 3 and res.target_colour is not None


def test_protect_eps_bound_off_grid_and_invert_target(tiny):
    x = torch.rand(1, 3, 24, 24)  # not on the uint8 grid
    res = protect(tiny, x, _mask(1, 24, 24), AttackAsDefenseConfig(eps=0.01, steps=2, target="invert"))
    assert res.delta.abs().max() <= 0.01 + 1e-6
    assert res.target_colour is None and torch.allclose(res.target, 1 - x)


def test_protect_bad_masks(tiny):
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(DiffshieldError, match="empty"):
        protect(tiny, x, torch.zeros(1, 1, 16, 16))
    with pytest.raises(DiffshieldError, match="whole image"):
        protect(tiny, x, torch.ones(1, 1, 16, 16))
    with pytest.raises(DiffshieldError, match="image's size"):
        protect(tiny, x, torch.ones(1, 1, 8, 16))


@pytest.mark.parametrize("kw", [{"eps": 0}, {"eps": 2}, {"steps": 0}, {"target": "purple"}, {"betas": (0.5, 1.0)},
                                {"init": 0.5}, {"w_hide": -1}])
def test_config_validation(kw):
    with pytest.raises(DiffshieldError):
        AttackAsDefenseConfig(**kw)


def test_eot_config_validation_and_transform():
    with pytest.raises(DiffshieldError):
        EOTConfig(p_jpeg=2)
    with pytest.raises(DiffshieldError):
        EOTConfig(jpeg_quality=(90, 50))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    m = _mask(2, 16, 16)
    masks3 = torch.cat([m, expand_mask(m, 2), ring_mask(m, expand_mask(m, 2))])
    cfg = EOTConfig(p_jpeg=1, p_resize=1, p_dilate=1, max_dilate=1)
    xv, mv = sample_transform(x, masks3, cfg, step=0, sample=0)
    assert xv.shape == x.shape and mv.shape == masks3.shape
    assert (mv[:2] >= m).all() and mv[:2].sum() > m.sum() and (mv[:2] <= masks3[2:4]).all()
    xv.sum().backward()  # straight-through gradient
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_protect_with_eot_stays_in_eps(tiny):
    x = torch.rand(1, 3, 24, 24)
    res = protect(tiny, x, _mask(1, 24, 24), AttackAsDefenseConfig(steps=2, eot=EOTConfig(samples=2)))
    assert res.delta.abs().max() <= 0.025 + 1e-6


def test_roundtrips():
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(uint8_roundtrip(x) * 255, (uint8_roundtrip(x) * 255).round(), atol=1e-4)
    assert jpeg_roundtrip(x, 75).shape == x.shape
    assert resize_roundtrip(x, 0.5).shape == x.shape
    smooth = torch.full((1, 3, 32, 32), 0.4)
    assert (jpeg_roundtrip(smooth, 95) - smooth).abs().max() < 0.02


def test_inpainter_interface(tiny):
    x = torch.rand(2, 3, 21, 27, requires_grad=True)
    m = _mask(2, 21, 27)
    y = tiny(x, m)
    assert y.shape == x.shape
    assert torch.equal(y[m.expand_as(y) == 0], x[m.expand_as(x) == 0])  # unchanged outside the hole
    y.sum().backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(DiffshieldError, match="does not match"):
        tiny(x, torch.zeros(2, 1, 20, 27))
    f = FnInpainter(lambda a, mm: torch.zeros_like(a))
    assert f(x, m)[m.expand_as(x) > 0].abs().max() == 0


def test_metrics():
    tgt = torch.tensor([0.0, 1.0, 0.0])[None, :, None, None].expand(2, 3, 8, 8)
    fill = tgt.clone()
    fill[1] = 0.5
    m = torch.ones(2, 1, 8, 8)
    assert success(fill, tgt, m).tolist() == [True, False]
    assert torch.isnan(target_fraction(fill, tgt, torch.zeros(2, 1, 8, 8))).all()
    assert success(fill, tgt, torch.zeros(2, 1, 8, 8)).tolist() == [False, False]
    p = psnr(fill, fill + 0.1)
    assert torch.allclose(p, torch.full((2,), 20.0), atol=1e-3)
    assert torch.isnan(psnr(fill, fill, torch.zeros(2, 1, 8, 8))).all()


def test_scenes_and_masks():
    s = make_scenes(6, 64, seed=3)
    assert s.images.shape == (6, 3, 64, 64) and s.without_object.shape == (6, 3, 64, 64)
    assert (s.object_masks.sum(dim=(1, 2, 3)) > 20).all()
    m = protected_masks(s.object_masks)
    assert (m >= s.object_masks).all()
    b = benign_masks(expand_mask(m))
    assert ((b * expand_mask(m)).sum() == 0) and (b.sum(dim=(1, 2, 3)) > 0).all()
    parts = partial_masks(m)
    me = expand_mask(m)
    for k, v in parts.items():
        assert (v <= me).all(), k
    tm, tt = training_masks(s, __import__("numpy").random.default_rng(0))
    assert tm.shape == (6, 1, 64, 64) and tt.shape == s.images.shape
    assert torch.equal(make_scenes(2, 64, seed=3).images, s.images[:2])


def test_evaluate_protection_keys(tiny):
    s = make_scenes(2, 64, seed=1)
    m = protected_masks(s.object_masks)
    ev = evaluate_protection(tiny, s.images, s.images, m)
    for k in ("success_rate", "success_rate_expanded", "psnr_protected", "psnr_benign", "success_rate_partial_half"):
        assert k in ev
    assert ev["psnr_protected"] == 100.0 and ev["psnr_benign"] == 100.0  # identical images


def test_load_inpainter_errors(tmp_path):
    with pytest.raises(DiffshieldError, match="does not exist"):
        load_inpainter(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DiffshieldError, match="TorchScript"):
        load_inpainter(bad)
    with pytest.raises(DiffshieldError, match="unknown toy"):
        load_inpainter("toy:nothing")
    with pytest.raises(DiffshieldError, match="not a toy inpainter folder"):
        load_inpainter(tmp_path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.13 deprecates TorchScript, still loads it
def test_torchscript_inpainter(tmp_path):
    class Lama(torch.nn.Module):  # the call shape of LaMa's big-lama.pt: (image, mask) -> image
        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            masked = image * (1 - mask)
            fill = masked.mean(dim=(2, 3), keepdim=True) * 2
            return mask * fill + (1 - mask) * image

    path = tmp_path / "big-lama.pt"
    torch.jit.save(torch.jit.script(Lama()), str(path))
    f = load_inpainter(path)
    x = torch.rand(1, 3, 20, 20, requires_grad=True)
    y = f(x, _mask(1, 20, 20))
    y.sum().backward()
    assert y.shape == x.shape and x.grad.abs().sum() > 0


def test_toy_inpainter_loss_falls_over_20_steps():
    torch.set_num_threads(1)
    f = load_inpainter("toy")
    s = make_scenes(2, 64, seed=10_000)
    res = protect(f, s.images, protected_masks(s.object_masks), AttackAsDefenseConfig())
    assert len(res.losses) == 20
    assert res.losses[-1] < res.losses[0] and min(res.losses[1:]) < res.losses[0]
    assert res.delta.abs().max() <= 0.025 + 1e-6


def test_protect_succeeds_against_a_sensitive_inpainter(sensitive_inpainter):
    """Sanity check of the optimiser: an inpainter that paints green when the context carries a faint +-1 pattern
    (a high-gain, LaMa-like reaction to faint cues) and grey otherwise is driven to the target by the paper's 20
    steps."""
    f, green = sensitive_inpainter
    x = (0.6 + 0.02 * torch.rand(2, 1, 32, 32)).expand(2, 3, 32, 32).contiguous()  # grey: target green
    m = _mask(2, 32, 32)
    clean = success(f(x, m), green.expand_as(x), m)
    res = protect(f, x, m, AttackAsDefenseConfig(w_hide=0))
    assert res.target_colour == [(0.0, 1.0, 0.0)] * 2
    assert not clean.any() and success(f(res.protected, m), green.expand_as(x), m).all()
    assert res.losses[-1] < 0.1 * res.losses[0]


# ----------------------------------------------------------------------------------------------- reported defects


def test_the_default_init_follows_a_small_eps_and_an_explicit_init_is_still_checked(tiny):
    assert AttackAsDefenseConfig().start_init == 0.01 and AttackAsDefenseConfig(eps=0.005).start_init == 0.005
    # the default is not frozen at construction: a copy with a smaller budget starts within it
    assert dataclasses.replace(AttackAsDefenseConfig(), eps=0.005).start_init == 0.005
    assert dataclasses.replace(AttackAsDefenseConfig(init=0.002), eps=0.005).start_init == 0.002
    with pytest.raises(DiffshieldError, match="init"):
        AttackAsDefenseConfig(eps=0.005, init=0.006)
    x = (torch.rand(1, 3, 24, 24) * 255).round() / 255
    res = protect(tiny, x, _mask(1, 24, 24), AttackAsDefenseConfig(eps=0.005, steps=2))
    assert res.delta.abs().max() <= 0.005 + 1e-6


def test_quantize_needs_an_eps_of_one_8_bit_step_and_without_it_stays_within_eps(tiny):
    """Below 1/255 no uint8 level may lie within eps of an off-grid image (the old rounding landed up to 3 eps
    away): refused with quantize=True; quantize=False keeps the budget."""
    with pytest.raises(DiffshieldError, match="8-bit step"):
        AttackAsDefenseConfig(eps=0.003, init=0.0)
    AttackAsDefenseConfig(eps=1 / 255)  # one step: accepted
    torch.manual_seed(0)
    x = torch.rand(1, 3, 24, 24)  # not on the 8-bit grid
    res = protect(tiny, x, _mask(1, 24, 24), AttackAsDefenseConfig(eps=0.003, quantize=False, steps=2))
    assert (res.protected.double() - x.double()).abs().max() <= 0.003 + 1e-6


@pytest.mark.parametrize("bad, says", [
    (torch.rand(1, 3, 8, 8), "16 px"),
    (torch.rand(1, 3, 12, 40), "16 px"),
    ((torch.rand(1, 3, 32, 32) * 255).to(torch.uint8), "uint8"),
    (torch.rand(1, 3, 32, 32) * 255, "[0, 1]"),
    (torch.full((1, 3, 32, 32), float("nan")), "[0, 1]"),
])
def test_protect_and_evaluate_refuse_what_they_cannot_take(tiny, bad, says):
    m = _mask(1, *bad.shape[-2:])
    with pytest.raises(DiffshieldError, match=says.replace("[", r"\[").replace("]", r"\]")):
        protect(tiny, bad, m, AttackAsDefenseConfig(steps=1))
    good = torch.rand(bad.shape)
    with pytest.raises(DiffshieldError, match=says.replace("[", r"\[").replace("]", r"\]")):
        evaluate_protection(tiny, bad, good, m, partial=False)


def test_evaluate_protection_binarises_masks_as_protect_does(tiny):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32)
    m = torch.zeros(1, 1, 32, 32)
    m[..., 8:20, 8:20] = 1.0
    m[..., 20:26, 8:20] = 0.4  # a soft brush edge: not part of the region
    res = protect(tiny, x, m, AttackAsDefenseConfig(steps=1))
    soft = evaluate_protection(tiny, x, res.protected, m, partial=False)
    hard = evaluate_protection(tiny, x, res.protected, (m > 0.5).float(), partial=False)
    for k in ("target_fraction_M", "distance_to_target_M", "psnr_benign"):
        assert soft[k] == hard[k], k


def test_a_broken_toy_inpainter_folder_is_one_line(tiny, tmp_path):
    import json

    from diffshield.protect.inpainters import save_toy_inpainter

    good = save_toy_inpainter(tiny.net, tmp_path / "good")
    cfg = json.loads((good / "config.json").read_text())

    def broken(name, text):
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
        (d / "config.json").write_text(text)
        return d

    cases = [(broken("truncated", (good / "config.json").read_text()[:30]), "not valid JSON"),
             (broken("base", json.dumps({**cfg, "base": 8})), "do not match"),
             (broken("string", json.dumps({**cfg, "n_down": "2"})), "whole number"),
             (broken("list", "[1, 2]"), "not a JSON object")]
    for folder, says in cases:
        with pytest.raises(DiffshieldError, match=says) as e:
            load_inpainter(folder)
        assert "\n" not in str(e.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch 2.13 deprecates TorchScript, still loads it
def test_a_torchscript_inpainter_that_breaks_the_contract_is_one_line(tmp_path):
    class Half(torch.nn.Module):  # wrong shape
        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.avg_pool2d(image, 2)

    class One(torch.nn.Module):  # takes one argument
        def forward(self, batch: torch.Tensor) -> torch.Tensor:
            return batch[:, :3]

    class Bytes(torch.nn.Module):  # 0-255, as some LaMa exports
        def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return image * 255

    x, m = torch.rand(1, 3, 16, 16), _mask(1, 16, 16)
    for cls, says in ((Half, "shape"), (One, "failed when called"), (Bytes, "not \\[0, 1\\]")):
        path = tmp_path / f"{cls.__name__}.pt"
        torch.jit.save(torch.jit.script(cls()), str(path))
        f = load_inpainter(path)
        with pytest.raises(DiffshieldError, match=says) as e:
            f(x, m)
        assert "\n" not in str(e.value)


def test_a_folder_whose_name_starts_with_toy_is_a_path(tiny, tmp_path, monkeypatch):
    from diffshield.protect.inpainters import save_toy_inpainter

    monkeypatch.chdir(tmp_path)
    save_toy_inpainter(tiny.net, tmp_path / "toy_inpainter")
    f = load_inpainter("toy_inpainter")
    assert f.net.config.base == 4
    with pytest.raises(DiffshieldError, match="unknown toy"):
        load_inpainter("toy:nothing")
