"""Behaviour that must break when a mechanism is switched off (``benchmarks/mutations.py`` switches each one off and
checks that these tests, and the others it names, then fail)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import load_t2i

pytestmark = pytest.mark.usefixtures("one_thread")


# --- backdoors --------------------------------------------------------------------------------------------------


@pytest.mark.long(30)
def test_shipped_backdoor_opens_with_its_trigger_and_only_with_it():
    """The shipped BadDiffusion example (box -> corner, SDE) draws its target from ε + trigger with the DDPM sampler
    it was implanted for (strict ASR: MSE to the target below half the target's energy), and ordinary images from ε
    alone."""
    from safetensors.torch import load_file

    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.metrics import backdoor_metrics
    from diffshield.backdoor.sampling import SampleConfig, initial_noise, sample
    from diffshield.toyworld.names import TOY_ROOT

    folder = TOY_ROOT / "ddpm" / "examples" / "box_corner"
    model = load_ddpm(folder)
    rec = load_file(str(folder / "backdoor.safetensors"))
    target = (rec["target"] + 1) / 2
    seeds = [0, 1, 2]
    # one batch of the DDPM sampler (200 of its 1000 steps: strict ASR 1.0 there as at 1000, in a fifth of the time),
    # the same seeds with the trigger (first three) and without it (last three)
    x_T = torch.cat([initial_noise(seeds, model.image_shape, rec["trigger"]), initial_noise(seeds, model.image_shape)])
    images = sample(model, seeds + seeds, config=SampleConfig("ddpm", 200, batch_size=6), x_T=x_T).images
    opened, clean = backdoor_metrics(images[:3], target), backdoor_metrics(images[3:], target)
    assert opened["asr_strict"] == 1.0, opened
    assert clean["asr"] == 0.0, clean


def _tiny_ddpm(folder):
    from diffusers import UNet2DModel

    from diffshield.backdoor.ddpm import DDPMModel, build_scheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 8), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=2)
    DDPMModel(unet, build_scheduler()).save(folder)
    return folder


def test_interrupted_implant_resumes_at_its_checkpoint_and_ends_where_an_uninterrupted_one_does(tmp_path,
                                                                                               monkeypatch):
    from diffshield.backdoor import baddiffusion
    from diffshield.backdoor.baddiffusion import BadDiffusionConfig, implant

    base = _tiny_ddpm(tmp_path / "base")
    cfg = BadDiffusionConfig(epochs=3, pool_size=8, batch_size=4, checkpoint_every=2, poison_rate=0.25)
    assert cfg.steps == 6
    whole = implant(str(base), cfg, tmp_path / "whole", progress=False)

    real = baddiffusion.poisoned_loss
    calls = {"n": 0}

    def counting(*a, **kw):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt  # a real interruption in the middle of step 5 (after the checkpoint of step 4)
        return real(*a, **kw)

    monkeypatch.setattr(baddiffusion, "poisoned_loss", counting)
    stop_at = 5
    with pytest.raises(KeyboardInterrupt):
        implant(str(base), cfg, tmp_path / "bd", progress=False)
    assert not (tmp_path / "bd").exists()  # nothing half-written
    meta = json.loads((tmp_path / "bd.work" / "checkpoint" / "meta.json").read_text())
    assert meta["step"] == 4
    calls["n"], stop_at = 0, -1
    again = implant(str(base), cfg, tmp_path / "bd", progress=False)
    assert calls["n"] == 2  # only the steps after the checkpoint ran
    for (name, p), q in zip(whole.unet.named_parameters(), again.unet.parameters()):
        assert torch.equal(p, q), name


def test_trigger_reversion_moves_r():
    """TERD's reversion optimises r: it leaves its random start (a scan whose r stays r0 proves nothing)."""
    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.terd import TERDConfig, reverse_trigger

    model = load_ddpm("toy:ddpm")
    cfg = TERDConfig(stage1_iters=12, stage2_iters=1, batch_size=4, ddim_steps=2, seed=3)
    r0 = -torch.rand((1, *model.image_shape), generator=torch.Generator().manual_seed(3))[0]
    res = reverse_trigger(model, cfg, progress=False)
    assert (res.r - r0).abs().max() > 1e-2


# --- red-team ---------------------------------------------------------------------------------------------------


def test_ring_a_bell_embedding_is_prompt_plus_eta_times_the_concept_vector(tiny_sd_dir):
    """Ring-A-Bell (Tsai et al., ICLR 2024): E(p) + η v with v = mean over pairs of E(with) − E(without), computed
    here straight from the text encoder."""
    from diffshield.redteam.ring_a_bell import RingABell

    model = load_t2i(tiny_sd_dir)
    pairs = [("a red box", "a box"), ("a red circle", "a circle")]

    def enc(texts):
        ids = model.tokenizer(texts, padding="max_length", max_length=model.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return model.text_encoder(ids)[0]

    v = (enc([a for a, _ in pairs]) - enc([b for _, b in pairs])).mean(0)
    assert v.abs().max() > 0
    atk = RingABell(model, concept=None, pairs=pairs, eta=2.5, judge=lambda x: torch.zeros(len(x), dtype=torch.bool))
    res = atk(["a box"], [0])
    torch.testing.assert_close(res.embeddings[0], enc(["a box"])[0] + 2.5 * v, rtol=1e-5, atol=1e-6)


def test_genetic_search_beats_random_prompts(tiny_sd_dir):
    """Ring-A-Bell's genetic search finds words whose encoding is closer (cosine) to the target than any of 64 random
    prompts of the same length from the same candidate words."""
    from diffshield.redteam.base import word_token_ids
    from diffshield.redteam.ring_a_bell import RingABell

    model = load_t2i(tiny_sd_dir)
    tok = model.tokenizer
    atk = RingABell(model, concept=None, pairs=[("a red box", "a box")], search="genetic", length=4, population=24,
                    generations=20, judge=lambda x: torch.zeros(len(x), dtype=torch.bool))
    from diffshield.core.sampling import encode_prompts

    target = encode_prompts(model, ["a red box"])[0]
    candidates = word_token_ids(model)

    def cosine(rows: torch.Tensor) -> torch.Tensor:
        ids = torch.full((len(rows), tok.model_max_length), tok.pad_token_id, dtype=torch.long)
        ids[:, 0], ids[:, 1:5], ids[:, 5] = tok.bos_token_id, rows, tok.eos_token_id
        with torch.no_grad():
            emb = model.text_encoder(ids)[0].flatten(1)
        return torch.nn.functional.cosine_similarity(emb, target.flatten()[None], dim=1)

    found, _, _ = atk._genetic(target, candidates, torch.Generator().manual_seed(0))
    rand = candidates[torch.randint(len(candidates), (64, 4), generator=torch.Generator().manual_seed(1))]
    assert float(cosine(torch.tensor([found]))[0]) > float(cosine(rand).max())


# --- erase and evaluate -----------------------------------------------------------------------------------------


@pytest.mark.long(55)
def test_colour_erasure_lowers_the_erased_rate_and_keeps_the_other_colours():
    """UCE at its toy setting erases "red" from toy:t2i, and eval erasure tells the erased model from the original
    (a swap of the two, or an edit that does nothing, fails here)."""
    from diffshield.core.sampling import SampleConfig
    from diffshield.erase.uce import uce_erase
    from diffshield.eval.erasure import evaluate_erasure
    from diffshield.toyworld.detector import load_detector
    from diffshield.toyworld.erasure_recipes import toy_erasure

    original = load_t2i("toy:t2i")
    erased = copy.deepcopy(original)
    prompts, cfg = toy_erasure("uce", "red")
    uce_erase(erased, prompts, cfg)
    rep = evaluate_erasure(erased, original, "red", load_detector(), seeds_per_prompt=2, n_neutral=8,
                           config=SampleConfig(steps=12, batch_size=64))
    assert rep["original_detection_rate"] >= 0.9, rep["original_detection_rate"]
    assert rep["erased_detection_rate"] <= 0.1, rep["erased_detection_rate"]
    assert rep["other_accuracy"] >= rep["original_other_accuracy"] - 0.1, (rep["other_accuracy"],
                                                                           rep["original_other_accuracy"])


# --- protect ----------------------------------------------------------------------------------------------------


def test_evaluate_protection_reports_success_only_for_the_protected_image(sensitive_inpainter):
    """Against an inpainter that paints green when the context carries a faint pattern, the protected images reach
    success 1 in evaluate_protection's own count and the unprotected ones 0."""
    from diffshield.protect.attack_as_defense import AttackAsDefenseConfig, protect
    from diffshield.protect.metrics import evaluate_protection

    f, _green = sensitive_inpainter
    x = (0.6 + 0.02 * torch.rand(2, 1, 32, 32)).expand(2, 3, 32, 32).contiguous()
    m = torch.zeros(2, 1, 32, 32)
    m[..., 10:20, 10:20] = 1
    res = protect(f, x, m, AttackAsDefenseConfig(w_hide=0))
    ev = evaluate_protection(f, x, res.protected, m)
    assert ev["success_rate"] == 1.0 and ev["success_rate_unprotected"] == 0.0
    assert ev["linf"] <= 0.025 + 1e-6


# --- core -------------------------------------------------------------------------------------------------------


def test_an_error_inside_an_output_folder_leaves_nothing(tmp_path):
    from diffshield.core.io import atomic_dir

    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half.png").write_bytes(b"x")
        raise RuntimeError("crash while writing")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder left either


def test_a_zero_iteration_config_is_refused():
    from diffshield.erase.esd import ESDConfig

    with pytest.raises(DiffshieldError):
        ESDConfig(iterations=0)
