"""`diffshield erase` and `diffshield apply-delta` on the tiny model."""

import json

import torch

from diffshield.cli.main import main
from diffshield.core.loading import load_t2i


def test_erase_then_apply_delta_gives_the_same_model(tiny_sd_dir, tmp_path, capsys):
    out, rep = tmp_path / "erased", tmp_path / "run.json"
    assert main(["erase", "--method", "uce", "--model", str(tiny_sd_dir), "--concept", "triangle", "--concept",
                 "wedge", "--out", str(out), "--json", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["method"] == "uce" and 0 < report["fraction_changed"] < 1
    erased = load_t2i(out)
    original = load_t2i(tiny_sd_dir)
    changed = [n for n, p in erased.unet.named_parameters()
               if not torch.equal(p, dict(original.unet.named_parameters())[n])]
    assert changed and all("attn2.to_k" in n or "attn2.to_v" in n for n in changed)
    again = tmp_path / "again"
    assert main(["apply-delta", "--model", str(tiny_sd_dir), "--delta", str(out / "delta.safetensors"),
                 "--out", str(again)]) == 0
    rebuilt = load_t2i(again)
    for n, p in erased.unet.named_parameters():
        assert torch.equal(p, dict(rebuilt.unet.named_parameters())[n]), n


def test_erase_bad_concept_input_is_one_line(tiny_sd_dir, tmp_path, capsys):
    rc = main(["erase", "--method", "esd-x", "--model", str(tiny_sd_dir), "--concept", "star", "--lr", "-1",
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("diffshield: error:") and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_erase_esd_with_preserve_records_the_anchor(tiny_sd_dir, tmp_path):
    rep = tmp_path / "run.json"
    assert main(["erase", "--method", "esd-u", "--model", str(tiny_sd_dir), "--concept", "star", "--preserve",
                 "circle", "--preserve-weight", "2", "--iterations", "2", "--out", str(tmp_path / "e"),
                 "--json", str(rep)]) == 0
    cfg = json.loads(rep.read_text())["config"]
    assert cfg["preserve"] == ["circle"] and cfg["preserve_weight"] == 2.0 and cfg["variant"] == "u"


def test_preserve_weight_without_an_esd_anchor_is_refused(tiny_sd_dir, tmp_path, capsys):
    for method, extra in [("uce", ["--preserve", "circle"]), ("esd-u", [])]:
        rc = main(["erase", "--method", method, "--model", str(tiny_sd_dir), "--concept", "star", *extra,
                   "--preserve-weight", "2", "--out", str(tmp_path / method)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "--preserve-weight" in err and "\n" not in err
        assert not (tmp_path / method).exists()


def test_erase_closed_form_settings_reach_the_config(tiny_sd_dir, tmp_path, capsys):
    for method, key in (("uce", None), ("rece", "uce")):
        rep = tmp_path / f"{method}.json"
        assert main(["erase", "--method", method, "--model", str(tiny_sd_dir), "--concept", "a red square",
                     "--guide", "a blue square", "--token-mode", "changed", "--erase-scale", "2.5", "--lamb", "0.3",
                     "--preserve-scale", "0.5", "--out", str(tmp_path / method), "--json", str(rep)]) == 0
        cfg = json.loads(rep.read_text())["config"]
        cfg = cfg[key] if key else cfg
        got = (cfg["token_mode"], cfg["erase_scale"], cfg["lamb"], cfg["preserve_scale"])
        assert got == ("changed", 2.5, 0.3, 0.5)
    capsys.readouterr()
    rc = main(["erase", "--method", "esd-x", "--model", str(tiny_sd_dir), "--concept", "star", "--token-mode", "last",
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--token-mode" in err and "\n" not in err and not (tmp_path / "x").exists()


def test_erase_esd_options_reach_the_config_and_bad_ones_are_one_line(tiny_sd_dir, tmp_path, capsys):
    rep = tmp_path / "x.json"
    assert main(["erase", "--method", "esd-x", "--model", str(tiny_sd_dir), "--concept", "star", "--preserve",
                 "circle", "--x-params", "kv", "--preserve-at", "own+concept", "--kv-anchor-weight", "10",
                 "--iterations", "2", "--out", str(tmp_path / "x"), "--json", str(rep)]) == 0
    cfg = json.loads(rep.read_text())["config"]
    assert (cfg["x_params"], cfg["preserve_at"], cfg["kv_anchor_weight"]) == ("kv", "own+concept", 10.0)
    capsys.readouterr()
    for method, extra, flag in [("uce", ["--x-params", "kv"], "--x-params"),
                                ("esd-x", ["--kv-anchor-weight", "10"], "kv_anchor_weight"),
                                ("esd-u", ["--x-params", "kv"], "x_params")]:
        rc = main(["erase", "--method", method, "--model", str(tiny_sd_dir), "--concept", "star", *extra,
                   "--out", str(tmp_path / method)])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and flag in err and "\n" not in err and not (tmp_path / method).exists()


def test_esd_flags_reach_the_config(tiny_sd_dir, tmp_path, capsys):
    rep = tmp_path / "u.json"
    assert main(["erase", "--method", "esd-u", "--model", str(tiny_sd_dir), "--concept", "star", "--iterations", "1",
                 "--eta", "2", "--start-guidance", "4", "--batch-size", "2", "--sample-with", "frozen", "--seed", "3",
                 "--ddim-steps", "10", "--min-step", "5", "--checkpoint-every", "50", "--no-freeze-time-and-out",
                 "--erase-from", "a shape", "--out", str(tmp_path / "u"), "--json", str(rep)]) == 0
    cfg = json.loads(rep.read_text())["config"]
    got = {k: cfg[k] for k in ("eta", "start_guidance", "batch_size", "sample_with", "seed", "ddim_steps", "min_step",
                               "checkpoint_every", "freeze_time_and_out", "erase_from")}
    assert got == {"eta": 2.0, "start_guidance": 4.0, "batch_size": 2, "sample_with": "frozen", "seed": 3,
                   "ddim_steps": 10, "min_step": 5, "checkpoint_every": 50, "freeze_time_and_out": False,
                   "erase_from": ["a shape"]}
    capsys.readouterr()
    for method, extra, flag in [("uce", ["--eta", "2"], "--eta"),
                                ("uce", ["--no-freeze-time-and-out"], "--no-freeze-time-and-out"),
                                ("uce", ["--iterations", "5"], "--iterations"), ("rece", ["--lr", "1e-4"], "--lr"),
                                ("rece", ["--erase-from", "a shape"], "--erase-from"),
                                ("esd-x", ["--epochs", "2"], "--epochs"), ("uce", ["--preset", "style"], "--preset")]:
        rc = main(["erase", "--method", method, "--model", str(tiny_sd_dir), "--concept", "star", *extra,
                   "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and flag in err and "\n" not in err and not (tmp_path / "x").exists()


def test_toy_recipe_is_the_benchmark_setting(tiny_sd_dir, tmp_path):
    """--toy-recipe gives the edit benchmarks/erasure.py makes (same prompts, same config, same weights)."""
    from diffshield.erase.uce import uce_erase
    from diffshield.toyworld.erasure_recipes import esd_anchor_prompts, esd_prompts, toy_erasure

    rep = tmp_path / "uce.json"
    assert main(["erase", "--method", "uce", "--toy-recipe", "--model", str(tiny_sd_dir), "--concept", "striped",
                 "--out", str(tmp_path / "uce"), "--json", str(rep)]) == 0
    prompts, cfg = toy_erasure("uce", "striped")
    assert json.loads(rep.read_text())["recipe"]["prompts"] == prompts
    reference = load_t2i(tiny_sd_dir)
    uce_erase(reference, prompts, cfg)
    cli = dict(load_t2i(tmp_path / "uce").unet.named_parameters())
    original = dict(load_t2i(tiny_sd_dir).unet.named_parameters())
    for name, p in reference.unet.named_parameters():
        assert torch.equal(p, cli[name]), name
    assert any(not torch.equal(p, original[n]) for n, p in cli.items())  # and the edit did something

    rep = tmp_path / "esd.json"
    assert main(["erase", "--method", "esd-u", "--toy-recipe", "--model", str(tiny_sd_dir), "--concept", "triangle",
                 "--iterations", "1", "--preserve-weight", "3", "--ddim-steps", "4",
                 "--out", str(tmp_path / "esd"), "--json", str(rep)]) == 0
    report = json.loads(rep.read_text())
    assert report["recipe"]["prompts"] == esd_prompts("triangle")
    cfg = report["config"]
    assert cfg["batch_size"] == 4 and cfg["iterations"] == 1 and cfg["preserve_weight"] == 3.0  # kind, then flags
    assert cfg["preserve"] == esd_anchor_prompts("triangle", "uncond+others")


def test_toy_recipe_bad_input_is_one_line(tiny_sd_dir, tmp_path, capsys):
    base = ["erase", "--toy-recipe", "--model", str(tiny_sd_dir), "--out", str(tmp_path / "x")]
    for extra, needle in [(["--method", "uce", "--concept", "red", "--concept", "star"], "one toy concept"),
                          (["--method", "uce", "--concept", "red", "--guide", "blue"], "--guide"),
                          (["--method", "rece", "--concept", "red", "--preset", "style"], "--preset"),
                          (["--method", "esd-x", "--concept", "a cat"], "cat"),
                          (["--method", "uce", "--concept", "red", "--epochs", "2"], "epochs")]:
        rc = main(base + extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and "\n" not in err and not (tmp_path / "x").exists(), (extra, err)


def test_cheap_inputs_are_checked_before_models_load(tmp_path, capsys):
    """A missing delta or an unknown toy concept is named even when the model path is also wrong: the cheap check
    runs first, so the user does not wait for models to load only to be told the concept is unknown."""
    missing = str(tmp_path / "no-model")
    for argv, needle in [(["apply-delta", "--model", missing, "--delta", str(tmp_path / "d.safetensors"),
                           "--out", str(tmp_path / "o")], "delta"),
                         (["eval", "erasure", "--model", missing, "--original", missing, "--concept", "zebra"],
                          "zebra"),
                         (["audit", "--model", missing, "--original", missing, "--concept", "zebra"], "zebra")]:
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and needle in err and "no-model" not in err and "\n" not in err, (argv, err)
    assert not (tmp_path / "o").exists()
