"""UCE and RECE closed-form erasure, and erasure deltas, on the tiny random SD components."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import load_t2i
from diffshield.erase.base import ERASERS, EraseResult, cross_attention_kv
from diffshield.erase.closed_form import kv_weights
from diffshield.erase.delta import apply_delta, read_delta_info, save_delta
from diffshield.erase.rece import (
    RECEConfig,
    adversarial_embedding,
    adversarial_embedding_for,
    rece_erase,
)
from diffshield.erase.uce import UCEConfig, uce_erase


@pytest.fixture()
def model(tiny_model):
    """A private copy of the session's tiny model (the edits are in place)."""
    return copy.deepcopy(tiny_model)


def embed(model, prompt: str) -> tuple[torch.Tensor, int]:
    """(77, d) float64 text embedding and the index of the last word token, straight from the components."""
    tok = model.tokenizer(prompt, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt")
    with torch.no_grad():
        emb = model.text_encoder(tok.input_ids)[0][0]
    return emb.double(), int(tok.attention_mask[0].sum()) - 2


def reference_rows(model, concepts, guides, preserve, mode):
    """Rows of the UCE problem, selected as the official 2023 script slices them (or one row in "last" mode)."""
    ks, ts, ps = [], [], []
    for c, g in zip(concepts, guides):
        (ec, ic), (eg, ig) = embed(model, c), embed(model, g)
        if mode == "last":
            ks.append(ec[ic:ic + 1])
            ts.append(eg[ig:ig + 1])
        elif mode == "changed":  # from the first token where the two prompts differ, to the end
            ids = [model.tokenizer(q, padding="max_length", max_length=model.tokenizer.model_max_length,
                                   truncation=True).input_ids for q in (c, g)]
            i0 = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
            ks.append(ec[i0:])
            ts.append(eg[i0:])
        else:
            far = max(ic, ig)
            ks.append(ec[ic:len(ec) - max(0, far - ic)])
            ts.append(eg[ig:len(eg) - max(0, far - ig)])
    for p in [""] + preserve:
        ep, ip = embed(model, p)
        ps.append(ep[ip:ip + 1] if mode == "last" else ep)
    return ks, ts, ps


def reference_uce(w, ks, ts, ps, lamb, se, sp):
    """The spec's formula for one matrix, in float64, with its own inverse (the official code's structure)."""
    w = w.double()
    mat1 = lamb * w
    mat2 = lamb * torch.eye(w.shape[1], dtype=torch.float64)
    for k, t in zip(ks, ts):
        mat1 = mat1 + se * (w @ t.T) @ k
        mat2 = mat2 + se * k.T @ k
    for p in ps:
        mat1 = mat1 + sp * (w @ p.T) @ p
        mat2 = mat2 + sp * p.T @ p
    return mat1 @ torch.inverse(mat2)


def kv(model) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight.detach().clone() for n, m in cross_attention_kv(model.unet)}


# --- (1) UCE equals the per-matrix closed form -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["paper2023", "last", "changed"])
def test_uce_matches_per_matrix_float64_formula(model, mode):
    concepts, guides, preserve = ["a red square", "star"], [" ", "a blue circle"], ["green triangle"]
    cfg = UCEConfig(guides=guides, preserve=preserve, lamb=0.5, erase_scale=1.5, preserve_scale=0.7, token_mode=mode)
    before = kv(model)
    ks, ts, ps = reference_rows(model, concepts, guides, preserve, mode)
    result = uce_erase(model, concepts, cfg)

    assert len(result.changed) == len(before) == 8  # 4 attn2 modules in the tiny UNet, to_k + to_v
    for name, w in before.items():
        ref = reference_uce(w, ks, ts, ps, 0.5, 1.5, 0.7)
        got = dict(model.unet.named_parameters())[name].detach().double()
        assert (got - ref).norm() / ref.norm() <= 1e-4, name
        assert not torch.allclose(got, w.double())
        assert torch.equal(result.changed[name], got.float())
    total = sum(p.numel() for p in model.unet.parameters())
    assert result.fraction_changed == pytest.approx(sum(w.numel() for w in before.values()) / total)
    assert result.method == "uce" and result.config["token_mode"] == mode and result.seconds >= 0
    assert result.extra["rows_erased"] == sum(k.shape[0] for k in ks)
    json.dumps(result.config)


def test_paper2023_aligns_the_last_word_with_the_guides_bos(model):
    # " " tokenizes to BOS EOS: its row 0 (BOS) must face the concept's last word, and rows run to the end.
    ks, ts, _ = reference_rows(model, ["a red square"], [" "], [], "paper2023")
    (_, ic), (eg, _) = embed(model, "a red square"), embed(model, " ")
    assert ic == 3 and ks[0].shape == (77 - 3, 8)
    assert torch.equal(ts[0][0], eg[0])


def test_changed_mode_edits_a_mid_prompt_word_row(model):
    # "a red square" -> "a blue square": paper2023 starts at the last word ("square", index 3) and so leaves the row
    # of "red" (index 2) alone; "changed" starts where the prompts differ, at "red".
    (ec, _), (eg, _) = embed(model, "a red square"), embed(model, "a blue square")
    modes = {}
    for mode in ("paper2023", "changed"):
        m = copy.deepcopy(model)
        modes[mode] = uce_erase(m, ["a red square"], UCEConfig(guides="a blue square", token_mode=mode))
    assert modes["paper2023"].extra["rows_erased"] == 77 - 3
    assert modes["changed"].extra["rows_erased"] == 77 - 2
    w0 = kv(model)
    # the key of the "red" row moves towards the key of the "blue" row only in "changed" mode
    gaps = {mode: sum(float((r.changed[n].double() @ ec[2] - w0[n].double() @ eg[2]).norm()) for n in w0)
            for mode, r in modes.items()}
    base = sum(float((w0[n].double() @ (ec[2] - eg[2])).norm()) for n in w0)
    assert gaps["changed"] < 0.6 * base  # measured 0.55 (7.5 / 8.9 = 0.84 in paper2023 mode)
    assert gaps["changed"] < 0.75 * gaps["paper2023"]


# --- (2) Preserved prompts keep their keys/values, erased concepts move to the guide ---------------------------


def test_preserved_keys_stay_and_erased_keys_move_to_the_guide(model):
    before = kv(model)
    concept, guide, preserve = "red", " ", ["circle"]
    (ec, ic), (eg, ig) = embed(model, concept), embed(model, guide)
    k, t = ec[ic], eg[ig]
    kept = [e[i] for e, i in (embed(model, p) for p in ["", *preserve])]
    result = uce_erase(model, [concept], UCEConfig(guides=guide, preserve=preserve, token_mode="last"))
    after = {n: w.double() for n, w in result.changed.items()}

    def sq(x):
        return float(x.pow(2).sum())

    w0s = {n: w.double() for n, w in before.items()}
    gap_before = sum(sq(w0s[n] @ k - w0s[n] @ t) for n in w0s)
    gap_after = sum(sq(after[n] @ k - w0s[n] @ t) for n in w0s)
    # Without preserved rows the gap would shrink to about λ / (λ + s_e |k|²) = 0.5 / 8.5 of itself (the toy text
    # encoder ends with a layer norm: |k|² = d = 8). The preserved "circle" row is 0.8-correlated with "red" in
    # this random 8-d encoder and pulls back, so allow 0.3 (of the distance, not squared).
    assert gap_after < 0.3**2 * gap_before
    for p in kept:
        moved = sum(sq(after[n] @ p - w0s[n] @ p) for n in w0s)
        assert moved < 0.1**2 * sum(sq(w0s[n] @ p) for n in w0s)
        assert moved < 0.1 * gap_before  # the concept moved much more than the preserved prompts
    assert result.extra["embedding_drift_preserved"] < 0.1 and result.extra["gap_left_erased"] < 0.3


def test_larger_erase_scale_moves_the_concept_further(model, tiny_model):
    other = copy.deepcopy(tiny_model)
    weak = uce_erase(model, ["square"], UCEConfig(erase_scale=0.1, token_mode="last"))
    strong = uce_erase(other, ["square"], UCEConfig(erase_scale=10.0, token_mode="last"))
    assert strong.extra["gap_left_erased"] < weak.extra["gap_left_erased"]


# --- (3) RECE ----------------------------------------------------------------------------------------------------


def attack_residual(model, w0: dict, concept: str, lamb_r: float, variant: str = "regzero") -> float:
    """Σ_l ||W'_l c' - W0_l c||² / Σ_l ||W0_l c||² for the adversarial embedding c' against the model's weights."""
    c, _ = embed(model, concept)
    adv = adversarial_embedding_for(model, w0, concept, lamb_r=lamb_r, variant=variant)[0].double()
    cur = {n: w.double() for n, w in kv(model).items()}
    num = sum(((cur[n] @ adv.T) - (w0[n].double() @ c.T)).pow(2).sum() for n in w0)
    den = sum((w0[n].double() @ c.T).pow(2).sum() for n in w0)
    return float(num / den)


@pytest.mark.parametrize("variant", ["regzero", "standard"])
def test_rece_makes_the_adversarial_embedding_fail(model, tiny_model, variant):
    w0 = kv_weights(tiny_model)
    uce_only = copy.deepcopy(tiny_model)
    uce_erase(uce_only, ["red square"], UCEConfig())
    result = rece_erase(model, ["red square"], RECEConfig(epochs=2, lamb_r=0.1, variant=variant))

    r_uce = attack_residual(uce_only, w0, "red square", 0.1, variant)
    r_rece = attack_residual(model, w0, "red square", 0.1, variant)
    assert r_rece > 2 * r_uce  # the concept is much harder to regenerate from any embedding
    epochs = result.extra["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and result.extra["best_epoch"] == 2
    assert all(e["adv_residual_after"] > e["adv_residual_before"] for e in epochs[1:])
    assert result.extra["uce_adv_residual"] == pytest.approx(r_uce, rel=1e-3)
    assert result.extra["final_adv_residual"] == pytest.approx(r_rece, rel=1e-3)
    assert result.method == "rece" and result.config["variant"] == variant
    assert set(result.changed) == set(w0)
    json.dumps(result.config)


def test_adversarial_embedding_solves_its_normal_equations(model, tiny_model):
    w0 = kv_weights(tiny_model)
    uce_erase(model, ["star"], UCEConfig())
    cur = kv_weights(model)
    c, _ = embed(model, "star")
    old, _ = embed(model, " ")
    lam = 0.05
    for variant, c_old in (("regzero", None), ("standard", old)):
        adv = adversarial_embedding(list(cur.values()), list(w0.values()), c, lam, variant, c_old)
        # gradient of Σ||W'c' - W0c||² + λ||c' - c_old||² must vanish at every row
        pull = sum(w.double().T @ w0[n].double() @ c.T for n, w in cur.items())
        grad = sum(w.double().T @ w.double() @ adv.T for w in cur.values()) - pull
        grad = grad + lam * (adv - (0 if c_old is None else c_old)).T
        assert grad.abs().max() < 1e-5 * pull.abs().max()  # Σ W'ᵀW' is accumulated from float32 products
    # the convenience wrapper accepts the original model, a dict or a list, and returns (1, 77, d)
    a = adversarial_embedding_for(model, tiny_model, "star", lamb_r=lam)
    b = adversarial_embedding_for(model, list(w0.values()), ["star"], lamb_r=lam)
    assert a.shape == (1, 77, 8) and torch.allclose(a, b)
    with pytest.raises(DiffshieldError, match="c_old"):
        adversarial_embedding(cur, w0, c, lam, "standard")


def test_rece_select_keeps_the_best_epoch(model, tiny_model):
    scores = {0: 5.0, 1: 3.0, 2: 1.0, 3: 4.0}
    seen = {}

    def select(m, epoch):
        seen[epoch] = kv(m)
        return scores[epoch]

    result = rece_erase(model, ["red square"], RECEConfig(epochs=3, select=select))
    assert sorted(seen) == [0, 1, 2, 3] and result.extra["best_epoch"] == 2
    assert [e["score"] for e in result.extra["epochs"]] == [5.0, 3.0, 1.0, 4.0]
    two = copy.deepcopy(tiny_model)
    rece_erase(two, ["red square"], RECEConfig(epochs=2))
    for name, w in kv(two).items():
        assert torch.allclose(kv(model)[name], w, atol=1e-6)
        assert torch.allclose(seen[2][name], w, atol=1e-6)
    uce = copy.deepcopy(tiny_model)
    uce_erase(uce, ["red square"], UCEConfig())
    assert all(torch.allclose(seen[0][n], w, atol=1e-6) for n, w in kv(uce).items())
    assert result.config["select"].endswith("select")


def test_rece_presets_and_registry():
    nudity = RECEConfig.from_preset("nudity")
    assert (nudity.lamb_r, nudity.epochs) == (0.1, 3)
    style = RECEConfig.from_preset("style", epochs=2)
    assert (style.lamb_r, style.epochs, style.uce.guides) == (1e-3, 2, ["art"])
    assert RECEConfig.from_preset("object").lamb_r == 1e-3
    assert (RECEConfig.from_preset("object-easy").lamb_r, RECEConfig.from_preset("unsafe").epochs) == (0.1, 2)
    assert RECEConfig(uce={"lamb": 0.3}).uce.lamb == 0.3
    with pytest.raises(DiffshieldError, match="unknown RECE preset"):
        RECEConfig.from_preset("cats")
    with pytest.raises(DiffshieldError, match="unknown RECE setting"):
        RECEConfig.from_preset("nudity", lamda=1)
    assert ERASERS.get("uce") == (UCEConfig, uce_erase) and ERASERS.get("rece") == (RECEConfig, rece_erase)


@pytest.mark.parametrize("bad", [
    lambda: UCEConfig(lamb=0),
    lambda: UCEConfig(erase_scale=-1),
    lambda: UCEConfig(preserve_scale=-0.1),
    lambda: UCEConfig(token_mode="first"),
    lambda: UCEConfig(guides=[]),
    lambda: RECEConfig(variant="gd"),
    lambda: RECEConfig(epochs=-1),
    lambda: RECEConfig(epochs=1.5),
    lambda: RECEConfig(lamb_r=-1),
    lambda: RECEConfig(lamb2=0),
    lambda: RECEConfig(select=3),
])
def test_config_validation(bad):
    with pytest.raises(DiffshieldError) as e:
        bad()
    assert "\n" not in str(e.value)


def test_erase_argument_errors(model):
    with pytest.raises(DiffshieldError, match="2 guides for 3 concepts"):
        uce_erase(model, ["red", "blue", "star"], UCEConfig(guides=["a", "b"]))
    with pytest.raises(DiffshieldError, match="both erased and preserved"):
        uce_erase(model, ["star"], UCEConfig(preserve=["star"]))
    with pytest.raises(DiffshieldError, match="at least one concept"):
        rece_erase(model, [], RECEConfig())


# --- (4) Deltas and saving -----------------------------------------------------------------------------------------


def test_delta_reproduces_the_edit_and_stock_diffusers_loads_the_saved_model(model, tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = rece_erase(model, ["red square"], RECEConfig(epochs=1))
    path = save_delta(result, tmp_path / "erase.safetensors", base_model=str(tiny_sd_dir))
    info = read_delta_info(path)
    assert info["method"] == "rece" and info["config"]["epochs"] == 1 and info["base_model"] == str(tiny_sd_dir)
    assert info["fraction_changed"] == pytest.approx(result.fraction_changed)
    assert sorted(info["tensors"]) == sorted(result.changed)

    fresh = load_t2i(tiny_sd_dir)
    assert apply_delta(fresh, path)["method"] == "rece"
    edited = model.unet.state_dict()
    for name, value in fresh.unet.state_dict().items():
        assert torch.equal(value, edited[name]), name

    model.save(tmp_path / "edited")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "edited")
    loaded = dict(pipe.unet.named_parameters())
    for name, value in result.changed.items():
        assert torch.equal(loaded[name], value), name
    assert not torch.equal(loaded[name], dict(load_t2i(tiny_sd_dir).unet.named_parameters())[name])


def test_delta_refuses_a_model_it_was_not_computed_on(model, tiny_sd_dir, tmp_path, capsys):
    """The delta's tensors replace the base's: on another model (another seed of the same architecture, or the base
    with an adapter merged into the edited layers' modules) they would graft the base's edited layers onto it. The
    base-model probe refuses such a model and leaves it untouched; the base itself passes in another dtype."""
    from conftest import build_tiny_pipeline
    from diffshield.cli.main import main

    path = save_delta(uce_erase(model, ["red square"], UCEConfig()), tmp_path / "d.safetensors", base_model="tiny")
    assert len(read_delta_info(path)["base_probe"]) == 6
    edited = {n: p.detach().clone() for n, p in model.unet.named_parameters()}

    same = load_t2i(tiny_sd_dir, dtype="bfloat16")  # the base, rounded: passes
    apply_delta(same, path)
    for n, p in same.unet.named_parameters():
        assert torch.equal(p, edited[n].to(torch.bfloat16)), n

    other_dir = build_tiny_pipeline(tmp_path / "other", seed=1)
    other = load_t2i(other_dir)
    before = {n: p.detach().clone() for n, p in other.unet.named_parameters()}
    with pytest.raises(DiffshieldError, match="computed on another model .*--any-base") as e:
        apply_delta(other, path)
    assert "\n" not in str(e.value)
    assert all(torch.equal(p, before[n]) for n, p in other.unet.named_parameters())  # nothing written
    apply_delta(other, path, any_base=True)  # asked for: applied
    assert torch.equal(dict(other.unet.named_parameters())[next(iter(kv(model)))], edited[next(iter(kv(model)))])

    merged = load_t2i(tiny_sd_dir)  # an adapter merged into attn2 (to_q moves with to_k / to_v): refused
    q = next(m for n, m in merged.unet.named_modules() if n.endswith("attn2.to_q"))
    with torch.no_grad():
        q.weight.mul_(1.05)
    with pytest.raises(DiffshieldError, match="attn2.to_q.weight' differs"):
        apply_delta(merged, path)

    out = tmp_path / "applied"
    assert main(["apply-delta", "--model", str(other_dir), "--delta", str(path), "--out", str(out)]) == 2
    assert not out.exists() and "--any-base" in capsys.readouterr().err
    assert main(["apply-delta", "--model", str(other_dir), "--delta", str(path), "--out", str(out),
                 "--any-base"]) == 0
    assert (out / "model_index.json").exists()


@pytest.mark.parametrize("method", ["uce", "rece", "esd-x"])
def test_a_delta_never_silently_undoes_another_edit_of_its_base(method, tiny_sd_dir, tmp_path, capsys):
    """Two deltas computed on the same base, one per concept: applying the second over the first would replace the
    first's edited layers with the base's and bring its concept back. It is refused (nothing written) unless asked
    for; applying a delta to a model that already holds it passes (nothing changes)."""
    from diffshield.cli.main import main
    from diffshield.erase import ERASERS
    from diffshield.erase.esd import ESDConfig

    cls, erase = ERASERS.get(method)
    cfg = ESDConfig(variant="x", iterations=2, lr=1e-2, ddim_steps=2) if method == "esd-x" else cls()
    paths = []
    for concept in ("red square", "blue star"):
        m = load_t2i(tiny_sd_dir)
        res = erase(m, [concept], cfg)
        assert sorted(res.base_values) == sorted(res.changed)
        paths.append(save_delta(res, tmp_path / f"{concept[:3]}.safetensors", base_model="tiny"))
    first = load_t2i(tiny_sd_dir)
    apply_delta(first, paths[0])
    after_first = {n: p.detach().clone() for n, p in first.unet.named_parameters()}
    undo = "differ in this model from the delta's base.*would undo it.*--any-base"
    with pytest.raises(DiffshieldError, match=undo) as e:
        apply_delta(first, paths[1])
    assert "\n" not in str(e.value)
    assert all(torch.equal(p, after_first[n]) for n, p in first.unet.named_parameters())  # nothing written
    apply_delta(first, paths[0])  # already there: passes, the same weights
    assert all(torch.equal(p, after_first[n]) for n, p in first.unet.named_parameters())
    apply_delta(first, paths[1], any_base=True)  # asked for: the second edit replaces the first's layers

    first_only = load_t2i(tiny_sd_dir)
    apply_delta(first_only, paths[0])
    first_only.save(tmp_path / "first")
    out = tmp_path / "both"
    assert main(["apply-delta", "--model", str(tmp_path / "first"), "--delta", str(paths[1]), "--out",
                 str(out)]) == 2
    assert not out.exists() and "would undo it" in capsys.readouterr().err


def test_delta_errors(model, tiny_model, tmp_path):
    with pytest.raises(DiffshieldError, match="does not exist"):
        apply_delta(model, tmp_path / "missing.safetensors")
    (tmp_path / "notes.safetensors").write_text("not a safetensors file at all")
    with pytest.raises(DiffshieldError, match="not a valid safetensors"):
        apply_delta(model, tmp_path / "notes.safetensors")

    name = next(iter(kv(model)))
    w = dict(model.unet.named_parameters())[name]

    def delta(changed, file):
        r = EraseResult(model=model, changed=changed, method="uce", config={}, seconds=0.0, fraction_changed=0.0)
        return save_delta(r, tmp_path / file, base_model="tiny")

    with pytest.raises(DiffshieldError, match="not a parameter of this model's UNet") as e:
        apply_delta(model, delta({"down_blocks.9.attn2.to_k.weight": torch.zeros(2, 2)}, "name.safetensors"))
    assert "\n" not in str(e.value)
    bias = model.unet.conv_in.bias
    before = bias.detach().clone()
    bad_shape = {"conv_in.bias": before + 1, name: torch.zeros(w.shape[0] + 1, w.shape[1])}
    with pytest.raises(DiffshieldError, match="has shape"):
        apply_delta(model, delta(bad_shape, "shape.safetensors"))
    assert torch.equal(bias, before)  # nothing written, not even the tensor that fits
    truncated = delta({name: w.detach() + 1}, "cut.safetensors")
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(DiffshieldError, match="not a valid safetensors"):
        apply_delta(model, truncated)
    with pytest.raises(DiffshieldError, match="no tensor"):
        delta({}, "empty.safetensors")
    from safetensors.torch import save_file

    save_file({"text_encoder.w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(DiffshieldError, match="not a UNet tensor"):
        apply_delta(model, tmp_path / "other.safetensors")


# --- (4) Official options, each against a float64 per-matrix reference of the official code ------------------------


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def reference_uce_tensor(w, ks, ts, ps, lamb, se, sp):
    """train_erase.py's ``technique='tensor'`` for one matrix: the guide's values minus their projection on u = the
    concept's values / their Frobenius norm, then its mat1 @ inverse(mat2), all float64."""
    w = w.double()
    mat1 = lamb * w
    mat2 = lamb * torch.eye(w.shape[1], dtype=torch.float64)
    for k, t in zip(ks, ts):
        u = k @ w.T
        u = u / u.norm()
        new = t @ w.T
        target = new - (u * new).sum() * u
        mat1 = mat1 + se * target.T @ k
        mat2 = mat2 + se * k.T @ k
    for p in ps:
        mat1 = mat1 + sp * (w @ p.T) @ p
        mat2 = mat2 + sp * p.T @ p
    return mat1 @ torch.inverse(mat2)


def test_uce_tensor_technique_matches_the_official_per_matrix_code(model):
    concepts, guides, preserve = ["a red square", "star"], [" ", "a blue circle"], ["green triangle"]
    cfg = UCEConfig(guides=guides, preserve=preserve, erase_scale=1.5, preserve_scale=0.7, technique="tensor")
    before = kv(model)
    ks, ts, ps = reference_rows(model, concepts, guides, preserve, "paper2023")
    uce_erase(model, concepts, cfg)
    after = dict(model.unet.named_parameters())
    for name, w in before.items():
        ref = reference_uce_tensor(w, ks, ts, ps, 0.5, 1.5, 0.7)
        assert rel(after[name].detach().double(), ref) <= 1e-5, name
        assert rel(ref, reference_uce(w, ks, ts, ps, 0.5, 1.5, 0.7)) > 1e-3  # a different edit from "replace"
    with pytest.raises(DiffshieldError, match="technique"):
        RECEConfig(uce={"technique": "tensor"})


def test_uce_auto_preserve_scale_and_prompt_expansion(model):
    """preserve_scale 'auto' is train_erase.py's max(0.1, 1/len(['']+preserve)); --add_prompts adds 5 templates per
    concept, each guided to the concept's guide."""
    from diffshield.erase.uce import EXPANSION_TEMPLATES, expand_prompts, preserve_scale_of

    assert preserve_scale_of(UCEConfig()) == 1.0
    assert preserve_scale_of(UCEConfig(preserve=["a", "b", "c"])) == 0.25
    assert preserve_scale_of(UCEConfig(preserve=[f"p{i}" for i in range(20)])) == 0.1
    assert preserve_scale_of(UCEConfig(preserve=["a"], preserve_scale=0.7)) == 0.7
    concepts, guides = expand_prompts(["star"], ["art"], "art")
    assert concepts == ["star", "painting by star", "art by star", "artwork by star", "picture by star",
                        "style of star"] and guides == ["art"] * 6
    assert len(EXPANSION_TEMPLATES["object"]) == 5

    preserve = ["green triangle", "box"]
    before = kv(model)
    ks, ts, ps = reference_rows(model, concepts, guides, preserve, "paper2023")
    result = uce_erase(model, ["star"], UCEConfig(guides=["art"], preserve=preserve, expand_prompts="art"))
    assert result.extra["preserve_scale"] == pytest.approx(1 / 3)
    after = dict(model.unet.named_parameters())
    for name, w in before.items():
        assert rel(after[name].detach().double(), reference_uce(w, ks, ts, ps, 0.5, 1.0, 1 / 3)) <= 1e-5, name


def reference_rece(model, concepts, guides, uce_preserve, round_retain, epochs, lamb_r, variant="regzero",
                   item="1st", lamb2=0.1, sp2=0.1, sp1=1.0):
    """RECE as its official scripts run it, per matrix in float64: a UCE edit (train_erase.py), then per epoch one
    adversarial embedding per concept from the summed matrices of all layers (close_form_emb_regzero /
    close_form_emb's surrogate, with torch.inverse), then edit_model_adversarial with ``round_retain`` (the retain
    list as the script builds it, e.g. [' '] * N in train.py), technique 'replace'."""
    w0 = {n: w.double() for n, w in kv(model).items()}
    ks, ts, ps = reference_rows(model, concepts, guides, uce_preserve, "paper2023")
    cur = {n: reference_uce(w, ks, ts, ps, 0.5, 1.0, sp1) for n, w in w0.items()}
    cs = [embed(model, c)[0] for c in concepts]
    news = [embed(model, g)[0] for g in guides]
    retain = [embed(model, r)[0] for r in round_retain]
    d = cs[0].shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    for _ in range(epochs):
        s1 = sum(w.T @ w for w in cur.values())
        n0 = sum(cur[n].T @ w0[n] for n in cur)
        if variant == "regzero":
            mat1, mat2 = lamb_r * eye + s1, n0
        elif item == "1st":
            mat1, mat2 = (1 + lamb_r) * s1, n0 + lamb_r * s1
        elif item == "2nd":
            mat1, mat2 = lamb_r * eye + s1, lamb_r * eye + n0
        else:
            mat1, mat2 = lamb_r * eye + (1 + lamb_r) * s1, lamb_r * eye + n0 + lamb_r * s1
        coef = torch.inverse(mat1) @ mat2
        advs = [c @ coef.T for c in cs]
        nxt = {}
        for n, w in cur.items():
            m1, m2 = lamb2 * w, lamb2 * eye
            for a, t in zip(advs, news):
                m1 = m1 + (w @ t.T) @ a
                m2 = m2 + a.T @ a
            for r in retain:
                m1 = m1 + sp2 * (w @ r.T) @ r
                m2 = m2 + sp2 * r.T @ r
            nxt[n] = m1 @ torch.inverse(m2)
        cur = nxt
    return cur


@pytest.mark.parametrize("variant,item", [("regzero", "1st"), ("surrogate", "1st"), ("surrogate", "2nd"),
                                          ("surrogate", "both")])
def test_rece_rounds_match_the_official_per_matrix_code(model, variant, item):
    """Several concepts: train.py preserves ' ' once per concept in the rounds (weight 0.1 x N)."""
    concepts = ["a red square", "star", "green circle"]
    ref = reference_rece(model, concepts, [" "] * 3, [], [" "] * 3, 2, 0.1, variant, item)
    rece_erase(model, concepts, RECEConfig(epochs=2, variant=variant, surrogate_item=item))
    for name, w in kv(model).items():
        assert rel(w.double(), ref[name]) <= 1e-5, name


def test_rece_per_concept_empty_weighting_and_round_preserve(model, tiny_model):
    concepts = ["a red square", "star"]
    once = copy.deepcopy(tiny_model)
    rece_erase(once, concepts, RECEConfig(epochs=1, round_empty_per_concept=False))
    ref_once = reference_rece(tiny_model, concepts, [" "] * 2, [], [""], 1, 0.1)
    ref_per = reference_rece(tiny_model, concepts, [" "] * 2, [], [" "] * 2, 1, 0.1)
    rece_erase(model, concepts, RECEConfig(epochs=1))
    for name, w in kv(model).items():
        assert rel(w.double(), ref_per[name]) <= 1e-5, name
        assert rel(kv(once)[name].double(), ref_once[name]) <= 1e-5, name
        assert rel(ref_per[name], ref_once[name]) > 1e-6  # the weighting changes the edit
    # train_object.py: the UCE edit and the rounds preserve the same list ('' and the given prompts) once, λ 0.1
    obj = copy.deepcopy(tiny_model)
    cfg = RECEConfig.from_preset("object", uce={"preserve": ["box"]}, round_preserve=["", "box"], lamb2=0.2)
    assert cfg.round_empty_per_concept is False and cfg.uce.guides == [" "]
    rece_erase(obj, concepts, cfg)
    ref = reference_rece(tiny_model, concepts, [" "] * 2, ["box"], ["", "box"], 1, 1e-3, lamb2=0.2, sp1=0.5)
    for name, w in kv(obj).items():
        assert rel(w.double(), ref[name]) <= 1e-5, name
    style = RECEConfig.from_preset("style", uce={"preserve": ["box"]})
    assert style.uce.guides == ["art"] and style.uce.preserve == ["box"]


def test_a_concept_given_twice_is_refused_not_doubled():
    """'triangle' and 'Triangle' are one prompt to the tokenizer: two copies added the concept's rows twice (the
    result equalled --erase-scale 2) while the summary said s_e 1."""
    from diffshield.erase.esd import ESDConfig
    from diffshield.erase.uce import UCEConfig, check_uce_prompts

    with pytest.raises(DiffshieldError, match="'Triangle' is erased twice"):
        check_uce_prompts(["triangle", "Triangle"], UCEConfig(guides=["square"]))
    from diffshield.erase.esd.train import esd_erase

    with pytest.raises(DiffshieldError, match="erased twice"):
        esd_erase(None, [" a wedge", "a  wedge"], ESDConfig())
