"""The toy world: data, tokenizer, Fréchet distance, and end-to-end checks of the shipped models."""

import json

import numpy as np
import pytest
import torch

from diffshield.eval.frechet import frechet_distance
from diffshield.toyworld.names import TOY_ROOT
from diffshield.toyworld.shapes import COLOURS, SHAPES, STYLES, SYNONYMS, VOCAB_WORDS, ShapesWorld
from diffshield.toyworld.tokenizer import build_tokenizer_files

SHIPPED = (TOY_ROOT / "t2i" / "model_index.json").exists() and (TOY_ROOT / "detector" / "config.json").exists()
needs_shipped = pytest.mark.usefixtures("shipped_weights")


@pytest.fixture()
def shipped_weights():
    """Missing shipped weights fail these tests (a skipped check hides a broken checkout)."""
    assert SHIPPED, f"shipped toy weights missing under {TOY_ROOT}; rebuild them with 'make toyworld'"


def test_shapesworld_is_deterministic_and_labelled():
    a, b = ShapesWorld().sample(32, seed=3), ShapesWorld().sample(32, seed=3)
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    assert a.images.shape == (32, 32, 32, 3) and 0 <= a.images.min() and a.images.max() <= 1
    for i, cap in enumerate(a.captions):
        s = SHAPES[a.shape[i]]
        assert s in cap.split() or SYNONYMS[s] in cap.split()
        for w in cap.split():
            assert w in VOCAB_WORDS


def test_shapesworld_covers_the_label_space_and_synonyms():
    b = ShapesWorld().sample(600, seed=0)
    assert set(b.shape) == set(range(len(SHAPES))) and set(b.colour) == set(range(len(COLOURS)))
    assert set(b.style) == set(range(len(STYLES)))
    words = {w for c in b.captions for w in c.split()}
    assert set(SYNONYMS.values()) <= words


def test_world_version_2_changes_only_the_dots():
    """Version 2 draws larger dots; labels, captions, every other image and the random stream stay the same."""
    v1, v2 = ShapesWorld(version=1).sample(48, seed=5), ShapesWorld(version=2).sample(48, seed=5)
    assert v1.captions == v2.captions and np.array_equal(v1.style, v2.style)
    dotted = v1.style == STYLES.index("dotted")
    assert dotted.any() and (~dotted).any()
    assert np.array_equal(v1.images[~dotted], v2.images[~dotted])
    assert all(not np.array_equal(a, b) for a, b in zip(v1.images[dotted], v2.images[dotted]))
    # larger dots: fewer, bigger white holes, so fewer colour/white edges inside the shape
    edges = [float(np.abs(np.diff(v.images[dotted], axis=2)).sum()) for v in (v1, v2)]
    assert edges[1] < edges[0]
    with pytest.raises(ValueError, match="version"):
        ShapesWorld(version=3)


def test_tokenizer_keeps_every_word_whole(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(build_tokenizer_files(VOCAB_WORDS, tmp_path / "tok"))
    for w in VOCAB_WORDS:
        assert len(tok(w).input_ids) == 3, w  # BOS, word, EOS
    assert tok("a zebra").input_ids[-1] == tok.eos_token_id  # unknown words fall back to characters


def test_frechet_distance_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 4))
    b = rng.normal(size=(4000, 4)) + np.array([2.0, 0, 0, 0])
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    for n in (2, 3, 16):  # few samples of many features: the square root's rounding went below 0 (-2.7e-05 at n=2)
        x = np.random.default_rng(n).normal(size=(n, 128))
        assert frechet_distance(x, x) >= 0
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.1)
    c = rng.normal(size=(4000, 4)) * 2  # covariance 4I vs I: trace term 4 * (1 + 4 - 2*2) = 4
    assert frechet_distance(a, c) == pytest.approx(4.0, rel=0.15)


@needs_shipped
def test_shipped_model_loads_in_stock_diffusers():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(TOY_ROOT / "t2i")
    out = pipe("a red triangle", num_inference_steps=5, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    recipe = json.loads((TOY_ROOT / "recipe.json").read_text())
    assert "command" in recipe and recipe["config"]["seed"] == 0


@needs_shipped
def test_shipped_detector_reads_fresh_images():
    from diffshield.toyworld.detector import load_detector

    det = load_detector()
    b = ShapesWorld().sample(256, seed=777)
    pred = det.predict(torch.from_numpy(b.images).permute(0, 3, 1, 2))
    for head in ("shape", "colour", "style"):
        assert (pred[head][0].numpy() == getattr(b, head)).mean() >= 0.97, head


def test_detector_stored_in_float16_loads_as_float32_and_reads_the_same(tmp_path):
    """The shipped detectors are stored in float16 (half the size); loading casts them back to float32."""
    from safetensors import safe_open

    from diffshield.toyworld.detector import ConceptDetector

    torch.manual_seed(0)
    det = ConceptDetector().eval()
    det.save(tmp_path / "d16", dtype=torch.float16)
    with safe_open(str(tmp_path / "d16" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} <= {torch.float16, torch.int64}
    back = ConceptDetector.load(tmp_path / "d16")
    assert all(p.dtype == torch.float32 for p in back.parameters())
    x = torch.rand(16, 3, 32, 32)
    a, b = det.predict(x), back.predict(x)
    for head in a:
        assert torch.allclose(a[head][1], b[head][1], atol=2e-3)


@needs_shipped
def test_shipped_world1_detector_reads_world1_images():
    """toy:detector-v1 (stored in float16) judges the DDPM's world, version 1."""
    from diffshield.toyworld.detector import load_detector

    det = load_detector("toy:detector-v1")
    b = ShapesWorld(version=1).sample(256, seed=777)
    pred = det.predict(torch.from_numpy(b.images).permute(0, 3, 1, 2))
    for head in ("shape", "colour", "style"):
        assert (pred[head][0].numpy() == getattr(b, head)).mean() >= 0.97, head


@pytest.mark.long(50)
@needs_shipped
def test_shipped_model_meets_fidelity_bar_on_a_small_sample():
    from diffshield.core.loading import load_t2i
    from diffshield.eval.fidelity import fidelity_prompts, prompt_fidelity
    from diffshield.toyworld.detector import load_detector

    specs = fidelity_prompts(styles=False)  # 16 shape x colour prompts and their synonyms
    res = prompt_fidelity(load_t2i("toy:t2i"), load_detector(), seeds_per_prompt=2, specs=specs, progress=False)
    for group in ("word", "synonym"):
        assert res["groups"][group]["shape"] >= 0.9, res["groups"]
        assert res["groups"][group]["colour"] >= 0.9, res["groups"]


@needs_shipped
def test_cli_generate_writes_images_grid_and_manifest(tmp_path):
    from diffshield.cli.main import main

    out = tmp_path / "gen"
    assert main(["generate", "--prompt", "a blue star", "--n", "3", "--seed", "5", "--steps", "5",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["seed"] for r in manifest["images"]] == [5, 6, 7]
    env = manifest["environment"]  # what a rerun needs to give the same pixels
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["torch"] == torch.__version__
    assert env["diffshield"] and env["diffusers"] and manifest["sampling"]["batch_size"] == 64
    assert all((out / r["file"]).exists() for r in manifest["images"]) and (out / "grid.png").exists()


@pytest.mark.long(50)
def test_recipe_runs_end_to_end_and_the_continuation_stage_changes_the_unet(tmp_path):
    """The training recipe on a tiny budget: every stage runs, a rerun skips the finished stages, and the optional
    continuation stage (4b) starts from stage 4's weights and moves them."""
    from safetensors.torch import load_file

    from diffshield.core.errors import DiffshieldError
    from diffshield.toyworld.train import RecipeConfig, train_all

    cfg = RecipeConfig(pool_size=128, vae_steps=1, detector_steps=1, unet_steps=2, unet_extra_steps=2, ckpt_every=1,
                       threads=1)
    record = train_all(cfg, tmp_path / "work", tmp_path / "out")
    assert set(record["stage_seconds"]) >= {"t2i_s", "t2i_extra_s"}
    first = load_file(str(tmp_path / "work" / "t2i_final" / "unet" / "diffusion_pytorch_model.safetensors"))
    shipped = load_file(str(tmp_path / "out" / "t2i" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(first[k], shipped[k]) for k in first)  # the assembled UNet is stage 4b's
    assert json.loads((tmp_path / "work" / "t2i_extra_ckpt" / "state.json").read_text())["step"] == 2
    with pytest.raises(DiffshieldError, match="--overwrite"):  # a previous output is replaced only when asked
        train_all(cfg, tmp_path / "work", tmp_path / "out")
    again = train_all(cfg, tmp_path / "work", tmp_path / "out", overwrite=True)  # everything done: nothing retrained
    assert again["config"] == record["config"]
    assert load_file(str(tmp_path / "out" / "t2i" / "unet" / "diffusion_pytorch_model.safetensors")).keys() == \
        shipped.keys()
    # a folder that holds someone else's t2i/ is refused before any stage runs, and left as it was
    mine = tmp_path / "mine"
    (mine / "t2i").mkdir(parents=True)
    (mine / "t2i" / "model_index.json").write_text("{}")
    with pytest.raises(DiffshieldError, match="not empty"):
        train_all(cfg, tmp_path / "work5", mine, overwrite=True)
    assert (mine / "t2i" / "model_index.json").read_text() == "{}" and not (tmp_path / "work5").exists()
    with pytest.raises(DiffshieldError, match="inside --out"):  # the work folder would end up in the output
        train_all(cfg, tmp_path / "out6" / "work", tmp_path / "out6")
    inner = train_all(cfg, tmp_path / "work", tmp_path / "work" / "weights")  # the Makefile's layout
    assert inner["config"] == record["config"] and (tmp_path / "work" / "weights" / "t2i").is_dir()
    assert train_all(cfg, tmp_path / "work", tmp_path / "work" / "weights", overwrite=True)["config"] == \
        record["config"]
    with pytest.raises(ValueError, match="unet_extra_steps"):
        RecipeConfig(unet_extra_steps=-1)

    # continue an already trained model (here the one just built) in a fresh work folder: only stage 4b runs
    from diffshield.cli.main import main

    cont = RecipeConfig(pool_size=128, unet_extra_steps=1, threads=1)
    rec = train_all(cont, tmp_path / "work2", tmp_path / "out2", from_weights=tmp_path / "out")
    assert rec["from_weights"] == str(tmp_path / "out")
    again2 = load_file(str(tmp_path / "out2" / "t2i" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(shipped[k], again2[k]) for k in shipped)
    assert not (tmp_path / "work2" / "t2i_ckpt").exists()  # stage 4 was not trained again
    assert main(["toyworld", "train", "--from-weights", str(tmp_path / "out"), "--out", str(tmp_path / "out"),
                 "--work", str(tmp_path / "w3"), "--unet-extra-steps", "1"]) == 2
    assert main(["toyworld", "train", "--from-weights", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o4"),
                 "--work", str(tmp_path / "w4"), "--unet-extra-steps", "1"]) == 2


def test_recipe_world_version_guards_its_pool_and_reuses_a_given_vae(tmp_path):
    """A work folder's pool belongs to one world version; --vae copies a trained VAE instead of training one."""
    from diffshield.core.errors import DiffshieldError
    from diffshield.toyworld.train import RecipeConfig, stage_pool, stage_vae

    with pytest.raises(ValueError, match="world_version"):
        RecipeConfig(world_version=7)
    v2 = RecipeConfig(pool_size=16, world_version=2, threads=1)
    pool = stage_pool(v2, tmp_path)
    assert set(pool) == {"images", "shape", "colour", "style", "background"}
    assert np.array_equal(pool["images"][0], (ShapesWorld(version=2).render_labels(
        {k: pool[k][:1] for k in ("shape", "colour", "style", "background")}, seed=1).images[0] * 255).round())
    with pytest.raises(DiffshieldError, match="world version 2"):
        stage_pool(RecipeConfig(pool_size=16, world_version=1, threads=1), tmp_path)
    if SHIPPED:
        vae = stage_vae(RecipeConfig(pool_size=16, vae_from="toy", threads=1), tmp_path, pool)
        assert vae.config.latent_channels == 4 and (tmp_path / "vae" / "config.json").exists()
    with pytest.raises(DiffshieldError, match="not an AutoencoderKL folder"):
        stage_vae(RecipeConfig(pool_size=16, vae_from=str(tmp_path / "nowhere"), threads=1), tmp_path / "w", pool)


def test_recipe_refuses_a_work_folder_whose_stages_were_made_with_other_settings(tmp_path, capsys):
    """Each stage records the settings it was made with; a rerun with other settings is refused in one line before
    any work (naming what differs and every stage folder made with it), and nothing in the work folder changes.
    Threads and ckpt_every change no result and do not count."""
    from dataclasses import replace

    from diffshield.cli.main import main
    from diffshield.core.errors import DiffshieldError
    from diffshield.toyworld.train import RecipeConfig, train_all

    work = tmp_path / "work"
    cfg = RecipeConfig(pool_size=16, vae_steps=1, detector_steps=1, unet_steps=1, ckpt_every=1, threads=1)
    train_all(cfg, work, tmp_path / "out")
    before = {p: p.stat().st_mtime_ns for p in work.rglob("*")}
    w = str(work)
    for change, stage, says, made_from_it in (
            ({"seed": 5}, "pool", "seed: 0 there, 5 now", ["vae", "latents.safetensors", "detector", "t2i_final",
                                                           "t2i_ckpt"]),
            ({"pool_size": 32}, "pool", "pool_size: 16 there, 32 now", ["vae", "latents.safetensors", "detector",
                                                                        "t2i_final", "t2i_ckpt"]),
            ({"vae_steps": 2}, "VAE", "vae_steps: 1 there, 2 now", ["latents.safetensors", "detector", "t2i_final",
                                                                    "t2i_ckpt"]),
            ({"detector_steps": 2}, "detector", "detector_steps: 1 there, 2 now", []),
            ({"unet_steps": 3, "unet_lr": 1e-3}, "UNet and text encoder",
             "unet_steps: 1 there, 3 now; unet_lr: 0.0004 there, 0.001 now", [])):
        with pytest.raises(DiffshieldError) as e:
            train_all(replace(cfg, **change), work, tmp_path / "out2")
        msg = str(e.value)
        assert f"holds a {stage} made with other settings ({says}); use another --work or remove" in msg, msg
        assert "\n" not in msg and all(f"{w}/{name}" in msg for name in made_from_it), msg
    assert not (tmp_path / "out2").exists()
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*")} == before  # nothing rewritten, nothing removed
    # the same through the CLI: one line, status 2, before any work
    capsys.readouterr()
    assert main(["toyworld", "train", "--work", w, "--out", str(tmp_path / "out3"), "--pool-size", "16",
                 "--vae-steps", "1", "--detector-steps", "1", "--unet-steps", "1", "--seed", "7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(seed: 0 there, 7 now); use another --work or remove" in err, err
    # settings that change no result: everything is reused
    again = train_all(replace(cfg, threads=0, ckpt_every=5), work, tmp_path / "out4")
    assert again["config"]["threads"] == torch.get_num_threads()
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*") if p.name != "timings.json" and p.name != "train.log"} \
        == {p: t for p, t in before.items() if p.name != "timings.json" and p.name != "train.log"}
    # a stage without a record of its settings (an older diffshield's) is not trusted either
    (work / "detector.settings.json").unlink()
    with pytest.raises(DiffshieldError, match=f"holds a detector that records no settings .*remove {w}/detector$"):
        train_all(cfg, work, tmp_path / "out5")


def test_toyworld_train_passes_threads_to_the_recipe_and_records_them(tmp_path, monkeypatch):
    """``toyworld train --threads N`` sets the recipe's threads (it kept its default 2); 0 leaves torch's setting;
    recipe.json records the number the run used. The stages are stubbed: only the plumbing is under test."""
    from diffshield.cli.main import main
    from diffshield.toyworld import train

    seen = []
    monkeypatch.setattr(train, "stage_pool", lambda cfg, work: seen.append(cfg.threads) or {})
    monkeypatch.setattr(train, "stage_vae", lambda *a: torch.nn.Identity())
    monkeypatch.setattr(train, "stage_detector", lambda *a: None)
    monkeypatch.setattr(train, "stage_t2i", lambda *a: None)
    monkeypatch.setattr(train, "stage_t2i_extra", lambda cfg, work, *a: work / "t2i_final")
    monkeypatch.setattr(train, "assemble", lambda work, out, tok, t2i=None: out)

    def run(name: str, *threads: str) -> int:
        assert main(["toyworld", "train", "--work", str(tmp_path / "w"), "--out", str(tmp_path / name),
                     *threads]) == 0
        return json.loads((tmp_path / name / "recipe.json").read_text())["config"]["threads"]

    assert run("o3", "--threads", "3") == 3 and seen[-1] == 3 and torch.get_num_threads() == 3
    assert run("o2") == 2 and seen[-1] == 2  # the recipe's default
    torch.set_num_threads(1)
    assert run("o0", "--threads", "0") == 1 and seen[-1] == 0 and torch.get_num_threads() == 1


def test_toyworld_train_writes_into_the_work_folder_and_replaces_the_shipped_weights_only_when_told(
        tmp_path, monkeypatch):
    """The default --out is WORK/weights: the docs' reproduce commands (``--world-version 1 --work runs/world1``)
    had replaced the package's shipped toy:t2i, which every toy: command draws with. --out naming the package's
    weights folder is refused before any stage without --overwrite. The stages are stubbed."""
    from diffshield.cli.main import main
    from diffshield.toyworld import train
    from diffshield.toyworld.names import TOY_ROOT

    seen = []
    monkeypatch.setattr(train, "stage_pool", lambda cfg, work: seen.append(work) or {})
    monkeypatch.setattr(train, "stage_vae", lambda *a: torch.nn.Identity())
    monkeypatch.setattr(train, "stage_detector", lambda *a: None)
    monkeypatch.setattr(train, "stage_t2i", lambda *a: None)
    monkeypatch.setattr(train, "stage_t2i_extra", lambda cfg, work, *a: work / "t2i_final")
    monkeypatch.setattr(train, "assemble", lambda work, out, tok, t2i=None: out)
    shipped = {p: p.stat().st_mtime_ns for p in TOY_ROOT.rglob("*") if p.is_file()}

    assert main(["toyworld", "train", "--work", str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "weights" / "recipe.json").is_file() and len(seen) == 1
    assert main(["toyworld", "train", "--work", str(tmp_path / "w2"), "--out", str(TOY_ROOT)]) == 2
    assert len(seen) == 1  # refused before the first stage
    assert {p: p.stat().st_mtime_ns for p in TOY_ROOT.rglob("*") if p.is_file()} == shipped
