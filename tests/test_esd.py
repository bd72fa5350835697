"""ESD (Gandikota et al., ICCV 2023) on the tiny random pipeline: parameter sets, loss, determinism, resuming."""

import copy
import dataclasses

import pytest
import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import load_t2i
from diffshield.core.sampling import encode_prompts, make_scheduler
from diffshield.erase.base import ERASERS
from diffshield.erase.esd import (
    CHECKPOINT_FILE,
    ESDConfig,
    ESDUConfig,
    ESDXConfig,
    esd_erase,
    esd_loss,
    esd_target,
    iteration_generator,
    run_identity,
    sample_xt,
)

CONCEPT = "a red box"
FAST = dict(ddim_steps=4, lr=1e-3)


pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.unet.named_parameters()}


def differing(model, before):
    return {n for n, p in model.unet.named_parameters() if not torch.equal(p, before[n])}


def test_esd_x_changes_only_cross_attention(tiny_sd_dir):
    model = load_t2i(tiny_sd_dir)
    before = snapshot(model)
    res = esd_erase(model, [CONCEPT], ESDConfig(variant="x", iterations=2, **FAST), progress=False)
    moved = differing(model, before)
    assert moved and all(".attn2." in n for n in moved)
    assert any(n.endswith("attn2.to_k.weight") for n in moved) and any("attn2.to_out" in n for n in moved)
    assert set(res.changed) == moved
    assert all(torch.equal(res.changed[n], dict(model.unet.named_parameters())[n]) for n in moved)
    n_attn2 = sum(p.numel() for n, p in model.unet.named_parameters() if ".attn2." in n)
    assert res.fraction_changed == pytest.approx(n_attn2 / sum(p.numel() for p in model.unet.parameters()))
    assert res.method == "esd-x" and res.config["variant"] == "x" and len(res.extra["losses"]) == 2
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())


def test_esd_x_strict_changes_only_the_text_reading_matrices(tiny_sd_dir):
    """x_params="kv" (the official code's esd-x-strict): only attn2.to_k / attn2.to_v weights move."""
    model = load_t2i(tiny_sd_dir)
    before = snapshot(model)
    res = esd_erase(model, [CONCEPT], ESDConfig(variant="x", x_params="kv", iterations=2, **FAST), progress=False)
    moved = differing(model, before)
    assert moved and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in moved)
    assert any("to_k" in n for n in moved) and any("to_v" in n for n in moved)
    n_kv = sum(p.numel() for n, p in model.unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n)
    assert res.fraction_changed == pytest.approx(n_kv / sum(p.numel() for p in model.unet.parameters()))
    assert res.config["x_params"] == "kv"


@pytest.mark.parametrize("freeze", [True, False])
def test_esd_u_changes_only_the_rest(tiny_sd_dir, freeze):
    model = load_t2i(tiny_sd_dir)
    before = snapshot(model)
    res = esd_erase(model, [CONCEPT], ESDUConfig(iterations=2, freeze_time_and_out=freeze, **FAST), progress=False)
    moved = differing(model, before)
    assert set(res.changed) == moved and res.method == "esd-u"
    assert not any(".attn2." in n for n in moved)
    assert any(n.startswith("down_blocks.") for n in moved) and "conv_in.weight" in moved
    time_and_out = {n for n in moved if n.startswith(("time_embedding.", "conv_out.", "conv_norm_out."))}
    if freeze:
        assert not time_and_out
    else:
        assert {"time_embedding.linear_1.weight", "conv_out.weight"} <= time_and_out


@pytest.mark.parametrize("variant, lr, factor", [("x", 1e-3, 0.3), ("u", 3e-4, 0.6)])
def test_esd_loss_on_the_erased_concept_falls(tiny_sd_dir, variant, lr, factor):
    model = load_t2i(tiny_sd_dir)
    frozen = copy.deepcopy(model.unet)
    cond, uncond = encode_prompts(model, [CONCEPT]), encode_prompts(model, [""])
    sched = make_scheduler(model, "ddim")
    sched.set_timesteps(4)
    probes = []  # fixed (x_t, t, target) triples, x_t sampled with the original model
    for seed, k in [(100, 0), (101, 1), (102, 3)]:
        noise = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(seed))
        x_t = sample_xt(model, cond, uncond, k, noise, ddim_steps=4)
        t = sched.timesteps[k]
        probes.append((x_t, t, esd_target(frozen, x_t, t, cond, uncond, eta=1.0)))

    def probe_loss():
        with torch.no_grad():
            return sum(float(esd_loss(model.unet, x, t, cond, target)) for x, t, target in probes) / len(probes)

    before = probe_loss()
    res = esd_erase(model, [CONCEPT], ESDConfig(variant=variant, iterations=30, lr=lr, ddim_steps=4), progress=False)
    after = probe_loss()
    assert after < factor * before, (before, after)
    losses = res.extra["losses"]
    assert len(losses) == 30 and sum(losses[-10:]) < sum(losses[:10])
    assert set(res.extra["timesteps"]) <= set(sched.timesteps.tolist())
    assert res.extra["seconds_per_iteration"] > 0


def test_same_seed_same_weights_other_seed_other_weights(tiny_sd_dir):
    runs = {}
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        model = load_t2i(tiny_sd_dir)
        res = esd_erase(model, [CONCEPT, "a blue star"], ESDConfig(iterations=3, seed=seed, **FAST), progress=False)
        runs[name] = res
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a.changed.keys() == b.changed.keys()
    assert all(torch.equal(a.changed[n], b.changed[n]) for n in a.changed)
    assert a.extra["losses"] == b.extra["losses"] and a.extra["timesteps"] == b.extra["timesteps"]
    assert any(not torch.equal(a.changed[n], c.changed[n]) for n in a.changed)


def test_iteration_generator_depends_on_seed_and_iteration_only():
    draw = [
        torch.randint(1000, (4,), generator=iteration_generator(s, i)).tolist()
        for s, i in [(0, 0), (0, 0), (0, 1), (1, 0)]
    ]
    assert draw[0] == draw[1] and draw[0] != draw[2] and draw[0] != draw[3]


def test_interrupted_then_resumed_equals_uninterrupted(tiny_sd_dir, tmp_path):
    cfg = dict(checkpoint_every=3, **FAST)
    whole = esd_erase(load_t2i(tiny_sd_dir), [CONCEPT], ESDConfig(iterations=6, **cfg), progress=False)

    ckpt = tmp_path / "ckpt"
    first = esd_erase(
        load_t2i(tiny_sd_dir), [CONCEPT], ESDConfig(iterations=3, checkpoint_dir=ckpt, **cfg), progress=False
    )
    assert (ckpt / CHECKPOINT_FILE).exists() and first.extra["resumed_from"] == 0
    assert [p.name for p in ckpt.iterdir()] == [CHECKPOINT_FILE]  # no temporary files left behind
    resumed = esd_erase(
        load_t2i(tiny_sd_dir), [CONCEPT], ESDConfig(iterations=6, checkpoint_dir=ckpt, **cfg), progress=False
    )
    assert resumed.extra["resumed_from"] == 3
    assert resumed.changed.keys() == whole.changed.keys()
    assert all(torch.equal(resumed.changed[n], whole.changed[n]) for n in whole.changed)
    assert resumed.extra["losses"] == whole.extra["losses"]

    # the checkpoint is now at 6: rerunning with iterations=6 trains nothing and returns the same weights
    again_model = load_t2i(tiny_sd_dir)
    again = esd_erase(again_model, [CONCEPT], ESDConfig(iterations=6, checkpoint_dir=ckpt, **cfg), progress=False)
    assert again.extra["resumed_from"] == 6 and again.extra["seconds_per_iteration"] is None
    assert all(torch.equal(again.changed[n], whole.changed[n]) for n in whole.changed)


def test_checkpoint_of_another_run_is_refused(tiny_sd_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    esd_erase(load_t2i(tiny_sd_dir), [CONCEPT], ESDConfig(iterations=2, checkpoint_dir=ckpt, **FAST), progress=False)
    other = dict(FAST, lr=2e-3)
    with pytest.raises(DiffshieldError, match=r"different ESD run \(differs in: lr\)"):
        esd_erase(
            load_t2i(tiny_sd_dir), [CONCEPT], ESDConfig(iterations=4, checkpoint_dir=ckpt, **other), progress=False
        )
    with pytest.raises(DiffshieldError, match="concepts"):
        esd_erase(
            load_t2i(tiny_sd_dir),
            ["a blue star"],
            ESDConfig(iterations=4, checkpoint_dir=ckpt, **FAST),
            progress=False,
        )
    with pytest.raises(DiffshieldError, match="past the requested 1 iterations"):
        esd_erase(
            load_t2i(tiny_sd_dir), [CONCEPT], ESDConfig(iterations=1, checkpoint_dir=ckpt, **FAST), progress=False
        )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="z"), "variant must be 'x'"),
        (dict(eta=-1.0), "eta"),
        (dict(eta=float("nan")), "eta"),
        (dict(iterations=0), "iterations"),
        (dict(iterations=2.5), "iterations"),
        (dict(lr=0.0), "learning rate"),
        (dict(lr="1e-5"), "learning rate"),
        (dict(lr=5.0), "learning rate"),
        (dict(start_guidance=-1), "start_guidance"),
        (dict(ddim_steps=0), "ddim_steps"),
        (dict(seed=-1), "seed"),
        (dict(checkpoint_every=0), "checkpoint_every"),
        (dict(checkpoint_dir=""), "checkpoint_dir"),
        (dict(freeze_time_and_out="yes"), "freeze_time_and_out"),
        (dict(sample_with="ema"), "sample_with"),
        (dict(batch_size=0), "batch_size"),
        (dict(preserve=["a cat", None]), "preserve"),
        (dict(preserve=[3]), "preserve"),
        (dict(preserve=["a cat"], preserve_weight=-1), "preserve_weight"),
        (dict(preserve_at="everywhere"), "preserve_at"),
        (dict(preserve_at="own+concept"), "at least one preserve prompt"),
        (dict(preserve=["a cat"], preserve_guidance=0), "preserve_guidance"),
        (dict(preserve=["a cat"], preserve_guidance=float("inf")), "preserve_guidance"),
        (dict(preserve_guidance=5.0), "at least one preserve prompt"),
        (dict(preserve=["a cat"], preserve_at="own+concept", preserve_guidance=5.0), "preserve_at='own'"),
        (dict(min_step=-1), "min_step"),
        (dict(min_step=50), "min_step"),
        (dict(ddim_steps=10, min_step=10), "min_step"),
        (dict(min_step=2.5), "min_step"),
        (dict(x_params="q"), "x_params"),
        (dict(variant="u", x_params="kv"), "ESD-x only"),
        (dict(kv_anchor_weight=-1), "kv_anchor_weight"),
        (dict(kv_anchor_weight=1.0), "at least one preserve prompt"),
        (dict(variant="u", preserve=["a cat"], kv_anchor_weight=1.0), "needs ESD-x"),
        (dict(erase_from=["a cat", " "]), "erase_from"),
        (dict(erase_from=[3]), "erase_from"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(DiffshieldError, match=message) as info:
        ESDConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_presets_and_registry(tiny_model):
    assert ESDXConfig().variant == "x" and ESDUConfig().variant == "u"
    assert ESDConfig().lr == 1e-5 and ESDConfig().iterations == 1000 and ESDConfig().eta == 1.0
    assert isinstance(ESDConfig(lr=1).lr, float)
    with pytest.raises(DiffshieldError, match="ESDUConfig is ESD-u"):
        ESDUConfig(variant="x")
    assert ERASERS.get("esd-x") == (ESDXConfig, esd_erase)
    assert ERASERS.get("esd-u") == (ESDUConfig, esd_erase)
    with pytest.raises(DiffshieldError, match="at least one non-empty concept"):
        esd_erase(tiny_model, [], ESDConfig(iterations=1), progress=False)
    with pytest.raises(DiffshieldError, match="at least one non-empty concept"):
        esd_erase(tiny_model, ["  "], ESDConfig(iterations=1), progress=False)


def test_frozen_sampler_draws_x_t_from_the_original_unet(tiny_sd_dir, monkeypatch):
    """sample_with="frozen": every x_t comes from the original UNet, so it does not move as training goes on."""
    import diffshield.erase.esd.train as esd

    seen = []
    real = esd.sample_xt

    def spy(model, *a, **k):
        seen.append(model.unet)
        return real(model, *a, **k)

    monkeypatch.setattr(esd, "sample_xt", spy)
    model = load_t2i(tiny_sd_dir)
    res = esd_erase(model, [CONCEPT], ESDConfig(iterations=2, sample_with="frozen", **FAST), progress=False)
    assert res.extra["sampling_model"] == "frozen"
    assert seen and all(u is not model.unet for u in seen)
    seen.clear()
    model2 = load_t2i(tiny_sd_dir)
    esd_erase(model2, [CONCEPT], ESDConfig(iterations=2, **FAST), progress=False)
    assert seen and all(u is model2.unet for u in seen)


def test_min_step_trains_only_the_late_steps(tiny_sd_dir, monkeypatch):
    """min_step=m: every x_t is sampled down to a step k >= m; the default draws from the whole schedule, as before."""
    import diffshield.erase.esd.train as esd

    seen = []
    real = esd.sample_xt

    def spy(model, cond, uncond, k, *a, **kw):
        seen.append(k)
        return real(model, cond, uncond, k, *a, **kw)

    monkeypatch.setattr(esd, "sample_xt", spy)
    cfg = {**FAST, "ddim_steps": 10}
    esd_erase(load_t2i(tiny_sd_dir), [CONCEPT], ESDConfig(iterations=12, min_step=7, **cfg), progress=False)
    assert len(seen) == 12 and min(seen) >= 7 and max(seen) <= 9
    seen.clear()
    esd_erase(load_t2i(tiny_sd_dir), [CONCEPT], ESDConfig(iterations=12, **cfg), progress=False)
    assert min(seen) < 7  # 12 draws from U{0..9}: at least one below 7, for this seed
    assert "min_step" not in run_identity(load_t2i(tiny_sd_dir), [CONCEPT], ESDConfig(**cfg))
    assert run_identity(load_t2i(tiny_sd_dir), [CONCEPT], ESDConfig(min_step=7, **cfg))["min_step"] == 7


def test_batched_steps_carry_batch_size_samples(tiny_sd_dir, monkeypatch):
    """batch_size B: every step trains on B x_t samples (B noises at one DDIM step k), B prompts, B targets."""
    import diffshield.erase.esd.train as esd

    shapes = []
    real = esd.esd_loss

    def spy(unet, x_t, t, cond, target):
        shapes.append((tuple(x_t.shape), cond.shape[0], target.shape[0]))
        return real(unet, x_t, t, cond, target)

    monkeypatch.setattr(esd, "esd_loss", spy)
    model = load_t2i(tiny_sd_dir)
    res = esd_erase(model, [CONCEPT, "a blue star"], ESDConfig(iterations=2, batch_size=3, **FAST), progress=False)
    assert [s[1] for s in shapes] == [3, 3] and [s[2] for s in shapes] == [3, 3] and shapes[0][0][0] == 3
    assert len(res.extra["losses"]) == 2 and res.changed


def _probes(model, prompt, sampler, seeds, ks):
    """Fixed (x_t, t, cond, uncond) for ``prompt``: x_t after k of 4 DDIM steps of ``sampler`` from seeded noise."""
    cond, uncond = encode_prompts(model, [prompt]), encode_prompts(model, [""])
    sched = make_scheduler(model, "ddim")
    sched.set_timesteps(4)
    out = []
    for seed, k in zip(seeds, ks):
        noise = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(seed))
        out.append((sample_xt(sampler, cond, uncond, k, noise, ddim_steps=4), sched.timesteps[k], cond, uncond))
    return out


def _erase_error(model, frozen):
    """ESD loss of ``model`` on CONCEPT at fixed x_t (sampled by the original) and t; targets from ``frozen``."""
    probes = _probes(model, CONCEPT, dataclasses.replace(model, unet=frozen), (100, 101, 102), (0, 1, 3))
    with torch.no_grad():
        return sum(float(esd_loss(model.unet, x, t, c, esd_target(frozen, x, t, c, u, eta=1.0)))
                   for x, t, c, u in probes) / len(probes)


def _keep_error(model, frozen, prompt):
    """Mean squared difference between the model's and the original's ε on ``prompt`` at fixed x_t and t."""
    probes = _probes(model, prompt, model, (200, 201, 202), (0, 1, 2))
    with torch.no_grad():
        return sum(float(((model.unet(x, t, encoder_hidden_states=c).sample
                           - frozen(x, t, encoder_hidden_states=c).sample) ** 2).mean())
                   for x, t, c, _ in probes) / len(probes)


def test_preservation_anchor_keeps_the_anchored_prompt_and_still_erases(tiny_sd_dir):
    """preserve=[c_p]: the fine-tuned UNet's ε on c_p stays closer to the original's than plain ESD leaves it,
    while the ESD loss on the erased concept still falls."""
    keep = "a blue star"
    cfg = dict(variant="u", iterations=30, lr=3e-4, ddim_steps=4)
    plain = load_t2i(tiny_sd_dir)
    frozen = copy.deepcopy(plain.unet)
    res_plain = esd_erase(plain, [CONCEPT], ESDConfig(**cfg), progress=False)
    anchored = load_t2i(tiny_sd_dir)
    res = esd_erase(anchored, [CONCEPT], ESDConfig(preserve=[keep], preserve_weight=1.0, **cfg), progress=False)
    assert _keep_error(anchored, frozen, keep) < 0.5 * _keep_error(plain, frozen, keep)
    assert len(res.extra["preserve_losses"]) == 30 and res_plain.extra["preserve_losses"] == []
    original = dataclasses.replace(anchored, unet=frozen)
    assert _erase_error(anchored, frozen) < 0.75 * _erase_error(original, frozen)  # measured 0.63x (plain: 0.39x)


def test_anchor_off_leaves_runs_and_their_checkpoint_identity_unchanged(tiny_sd_dir):
    model = load_t2i(tiny_sd_dir)
    ident = run_identity(model, [CONCEPT], ESDConfig(**FAST))
    assert "preserve" not in ident and "preserve_weight" not in ident
    assert run_identity(model, [CONCEPT], ESDConfig(preserve=["a cat"], **FAST))["preserve"] == ["a cat"]


def test_anchor_at_the_concept_input_keeps_it_there(tiny_sd_dir, monkeypatch):
    """preserve_at="own+concept": every distinct anchor prompt is also held at the concept's x_t, in the same pass;
    the anchored prompt's prediction at concept inputs then stays nearer the original's than with "own" alone."""
    import diffshield.erase.esd.train as esd

    seen = []
    real = esd.esd_anchored_loss

    def spy(*a, **k):
        seen.append(a[9] if len(a) > 9 else k.get("shared"))
        return real(*a, **k)

    monkeypatch.setattr(esd, "esd_anchored_loss", spy)
    keep = "a blue star"
    cfg = dict(variant="x", iterations=30, lr=3e-4, ddim_steps=4, preserve=[keep, "", keep])
    own = load_t2i(tiny_sd_dir)
    frozen = copy.deepcopy(own.unet)
    esd_erase(own, [CONCEPT], ESDConfig(**cfg), progress=False)
    assert set(map(type, seen)) == {type(None)}
    seen.clear()
    both = load_t2i(tiny_sd_dir)
    esd_erase(both, [CONCEPT], ESDConfig(preserve_at="own+concept", **cfg), progress=False)
    assert len(seen) == 30 and all(s[0].shape[0] == 2 and s[1].shape[0] == 2 for s in seen)  # 2 distinct prompts

    def keep_at_concept(model):
        probes = _probes(model, CONCEPT, dataclasses.replace(model, unet=frozen), (300, 301, 302), (0, 1, 2))
        c = encode_prompts(model, [keep])
        with torch.no_grad():
            return sum(float(((model.unet(x, t, encoder_hidden_states=c).sample
                               - frozen(x, t, encoder_hidden_states=c).sample) ** 2).mean())
                       for x, t, _, _ in probes) / len(probes)

    assert keep_at_concept(both) < keep_at_concept(own)


def test_guided_anchor_compares_guided_predictions(tiny_sd_dir):
    """preserve_guidance=s: the anchor term is the MSE of ε(∅) + s [ε(c_p) − ε(∅)] against the original's, with the
    ∅ rows in the same UNet pass; the identity of runs at the default s = 1 is unchanged. (Its effect is measured on
    the toy model, not here: the tiny random UNet barely reads its prompt, so its guidance signal is noise.)"""
    from diffshield.erase.esd import esd_anchored_loss, run_identity

    keep = "a blue star"
    cfg = dict(variant="u", iterations=30, lr=3e-4, ddim_steps=4, preserve=["", keep])
    raw = load_t2i(tiny_sd_dir)
    assert "preserve_guidance" not in run_identity(raw, [CONCEPT], ESDConfig(**cfg))
    assert run_identity(raw, [CONCEPT], ESDConfig(preserve_guidance=5, **cfg))["preserve_guidance"] == 5.0
    guided = load_t2i(tiny_sd_dir)
    res = esd_erase(guided, [CONCEPT], ESDConfig(preserve_guidance=5, **cfg), progress=False)
    assert len(res.extra["preserve_losses"]) == 30 and res.changed

    # the loss is the formula: MSE of guided predictions, the ∅ rows in the same pass
    (x, t, c, u), = _probes(guided, keep, guided, (7,), (1,))
    target = torch.zeros_like(x)
    with torch.no_grad():
        loss, keep_term = esd_anchored_loss(guided.unet, x, t, c, target, x, c, target, 2.0, None, (5.0, u))
        e_c, e_u = guided.unet(x, t, encoder_hidden_states=c).sample, guided.unet(x, t, encoder_hidden_states=u).sample
    expected = float(((e_u + 5.0 * (e_c - e_u)) ** 2).mean())
    assert float(keep_term) == pytest.approx(expected, rel=1e-4)
    assert float(loss) == pytest.approx(float((e_c**2).mean()) + 2.0 * expected, rel=1e-4)


def test_kv_anchor_holds_the_preserved_keys_and_values(tiny_sd_dir):
    """kv_anchor_weight: the preserved prompts' attn2 keys/values move far less than without it, the concept's
    ESD loss still falls; the penalty is 0 at the original weights."""
    from diffshield.erase.esd import esd_parameters, kv_anchor_penalty, kv_anchor_terms

    keep = "a blue star"
    cfg = dict(variant="x", iterations=30, lr=3e-4, ddim_steps=4, preserve=[keep, ""])
    base = load_t2i(tiny_sd_dir)
    frozen = copy.deepcopy(base.unet)
    emb = encode_prompts(base, [keep, ""])
    assert float(kv_anchor_penalty(kv_anchor_terms(esd_parameters(base.unet, "x"), emb))) == 0.0

    def kv_moved(model):
        terms = kv_anchor_terms(esd_parameters(frozen, "x"), emb)
        now = dict(model.unet.named_parameters())
        names = [n for n in esd_parameters(frozen, "x") if n.endswith(("to_k.weight", "to_v.weight"))]
        return sum(float(((now[n].detach() @ rows.T - ref) ** 2).sum() / norm)
                   for n, (_, rows, ref, norm) in zip(names, terms)) / len(terms)

    plain = load_t2i(tiny_sd_dir)
    esd_erase(plain, [CONCEPT], ESDConfig(**cfg), progress=False)
    held = load_t2i(tiny_sd_dir)
    esd_erase(held, [CONCEPT], ESDConfig(kv_anchor_weight=100.0, **cfg), progress=False)
    assert kv_moved(held) < 0.5 * kv_moved(plain)
    original = dataclasses.replace(held, unet=frozen)
    assert _erase_error(held, frozen) < 0.9 * _erase_error(original, frozen)


def test_empty_prompt_anchor_keeps_the_unconditional_prediction(tiny_sd_dir):
    """preserve=[""] anchors ε(x, ∅), the term classifier-free guidance subtracts: plain ESD moves it along with
    ε(x, c) (the toy world's failure), the anchored run keeps it nearer the original's."""
    cfg = dict(variant="x", iterations=30, lr=3e-4, ddim_steps=4)
    plain = load_t2i(tiny_sd_dir)
    frozen = copy.deepcopy(plain.unet)
    esd_erase(plain, [CONCEPT], ESDConfig(**cfg), progress=False)
    anchored = load_t2i(tiny_sd_dir)
    esd_erase(anchored, [CONCEPT], ESDConfig(preserve=[""], **cfg), progress=False)
    assert _keep_error(anchored, frozen, "") < 0.75 * _keep_error(plain, frozen, "")  # measured 0.57x


def test_toy_anchor_modes_interleave_the_empty_prompt():
    from diffshield.toyworld.erasure_recipes import esd_anchor_prompts, toy_erasure

    others = esd_anchor_prompts("red")
    assert others == ["a green", "a blue", "a yellow"]
    assert esd_anchor_prompts("red", "uncond+others") == ["", "a green", "", "a blue", "", "a yellow"]
    assert esd_anchor_prompts("red", "none") == []
    prompts, cfg = toy_erasure("esd-x", "red", preserve="uncond+others")
    assert prompts == ["a red"] and cfg.preserve == ["", "a green", "", "a blue", "", "a yellow"]
    with pytest.raises(DiffshieldError, match="anchor mode"):
        esd_anchor_prompts("red", "everything")


def test_toy_template_anchor_keeps_every_other_value_in_context_and_never_the_concept():
    """"uncond+templates": the closed-form methods' preserved templates, values in turn, "" before each."""
    from diffshield.toyworld.concepts import concept_prompts, resolve_concept
    from diffshield.toyworld.erasure_recipes import esd_anchor_prompts, toy_edit_prompts

    anchors = esd_anchor_prompts("striped", "uncond+templates")
    assert anchors[0::2] == [""] * (len(anchors) // 2)
    kept = anchors[1::2]
    assert sorted(kept) == sorted(toy_edit_prompts("striped").preserve)
    assert kept[:2] == ["a plain circle", "a dotted circle"]  # the values take turns
    assert not any("striped" in p for p in kept)
    evaluation = {p for o in ("plain", "dotted") for p, _ in concept_prompts(resolve_concept(o))}
    assert not evaluation & set(kept)  # the benchmark's prompts stay unseen


def test_esd_target_from_a_broader_prompt_starts_at_its_prediction(tiny_sd_dir):
    """erase_from's target: ε*(x, f) − η [ε*(x, c) − ε*(x, ∅)]; without a base, the paper's ε*(x, ∅) − η [...]."""
    model = load_t2i(tiny_sd_dir)
    c, f, u = (encode_prompts(model, [p]) for p in (CONCEPT, "a box", ""))
    x = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    t = make_scheduler(model, "ddim").timesteps[10]
    with torch.no_grad():
        e_c, e_f, e_u = (model.unet(x, t, encoder_hidden_states=e).sample for e in (c, f, u))
    got = esd_target(model.unet, x, t, c, u, eta=2.0, base=f)
    torch.testing.assert_close(got, e_f - 2.0 * (e_c - e_u), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(esd_target(model.unet, x, t, c, u, eta=2.0), e_u - 2.0 * (e_c - e_u),
                               rtol=1e-4, atol=1e-5)


def test_erase_from_samples_and_trains_the_broader_prompt(tiny_sd_dir, monkeypatch):
    """erase_from: x_t is sampled with the broader prompt f, and the loss falls on ε_θ(x_t, f) against the target
    from f; one prompt for all concepts is repeated, a wrong count is refused, and an unset option keeps the run
    identity that runs had before it."""
    import diffshield.erase.esd.train as esd

    model = load_t2i(tiny_sd_dir)
    f, c = encode_prompts(model, ["a box"]), encode_prompts(model, [CONCEPT])
    sampled, trained = [], []
    real_sample, real_loss = esd.sample_xt, esd.esd_loss
    monkeypatch.setattr(esd, "sample_xt", lambda m, c_, *a, **k: sampled.append(c_) or real_sample(m, c_, *a, **k))
    monkeypatch.setattr(esd, "esd_loss", lambda u, x, t, c_, tg: trained.append(c_) or real_loss(u, x, t, c_, tg))
    esd_erase(model, [CONCEPT], ESDConfig(iterations=2, erase_from=["a box"], **FAST), progress=False)
    assert len(sampled) == len(trained) == 2
    for e in sampled + trained:
        torch.testing.assert_close(e, f)
        assert not torch.allclose(e, c)
    with pytest.raises(DiffshieldError, match="one erase_from prompt per concept"):
        esd_erase(model, [CONCEPT, "a blue box", "a cat"], ESDConfig(iterations=1, erase_from=["a", "b"], **FAST),
                  progress=False)
    assert "erase_from" not in run_identity(model, [CONCEPT], ESDConfig(**FAST))
    assert run_identity(model, [CONCEPT], ESDConfig(erase_from="a box", **FAST))["erase_from"] == ["a box"]


def test_target_base_concept_is_esd_sd_py_form_and_its_eta_2_is_the_papers_eta_1(tiny_sd_dir):
    """esd_sd.py's target ε*(c) − η [ε*(c) − ε*(∅)] at η 2 equals the paper's ε*(∅) − η [ε*(c) − ε*(∅)] at η 1."""
    model = load_t2i(tiny_sd_dir)
    frozen = model.unet.eval()
    cond, uncond = encode_prompts(model, [CONCEPT, ""]).split(1)
    x_t = torch.randn((1, *model.latent_shape), generator=torch.Generator().manual_seed(0))
    t = make_scheduler(model, "ddim").timesteps[3]
    with torch.no_grad():
        e_c = frozen(x_t, t, encoder_hidden_states=cond).sample
        e_u = frozen(x_t, t, encoder_hidden_states=uncond).sample
    got = esd_target(frozen, x_t, t, cond, uncond, eta=0.5, target_base="concept")
    torch.testing.assert_close(got, e_c - 0.5 * (e_c - e_u), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(esd_target(frozen, x_t, t, cond, uncond, eta=2.0, target_base="concept"),
                               esd_target(frozen, x_t, t, cond, uncond, eta=1.0), rtol=1e-5, atol=1e-6)
    with pytest.raises(DiffshieldError, match="target_base"):
        ESDConfig(target_base="guide")
    assert "target_base" not in run_identity(model, [CONCEPT], ESDConfig())
    assert run_identity(model, [CONCEPT], ESDConfig(target_base="concept"))["target_base"] == "concept"


def test_cuda_graphs_setting_is_checked_and_does_not_change_the_run(tiny_sd_dir):
    """``cuda_graphs`` is an execution detail: a checkpoint resumes across it, and on the CPU it changes nothing."""
    with pytest.raises(DiffshieldError, match="cuda_graphs"):
        ESDConfig(cuda_graphs="yes")
    model = load_t2i(tiny_sd_dir)
    assert run_identity(model, [CONCEPT], ESDConfig(**FAST)) == run_identity(
        model, [CONCEPT], ESDConfig(cuda_graphs=False, **FAST))
    res = esd_erase(load_t2i(tiny_sd_dir), [CONCEPT], ESDConfig(iterations=2, ddim_steps=4), progress=False)
    assert res.extra["cuda_graphs"] is None  # no CUDA here: eager sampling
