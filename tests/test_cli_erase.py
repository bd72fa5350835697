"""`diffshield erase` and `diffshield apply-delta` on the tiny model."""

import json

import pytest
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
    report = json.loads(rep.read_text())
    cfg = report["config"]
    assert cfg["preserve"] == ["circle"] and cfg["preserve_weight"] == 2.0 and cfg["variant"] == "u"
    # the training curve is in the report (it was only in Python's result.extra)
    train = report["training"]
    assert len(train["losses"]) == len(train["timesteps"]) == 2 and len(train["preserve_losses"]) == 2
    assert train["resumed_from"] == 0 and all(x > 0 for x in train["losses"])


def test_preserve_weight_without_an_esd_anchor_is_refused(tiny_sd_dir, tmp_path, capsys):
    for method, extra in [("uce", ["--preserve", "circle"]), ("esd-u", ["--preset", "object"])]:
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
                                ("esd-x", ["--kv-anchor-weight", "10", "--preset", "style"], "kv_anchor_weight"),
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
                                ("esd-x", ["--epochs", "2"], "--epochs"),
                                ("uce", ["--round-lamb", "2"], "--round-lamb"),
                                ("esd-u", ["--preset", "object-easy"], "object-easy"),
                                ("uce", ["--select-epoch", "toy"], "--select-epoch"),
                                ("rece", ["--technique", "tensor"], "tensor")]:
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


def test_plain_erase_on_a_toy_model_uses_the_toy_setting_and_records_it(tiny_sd_dir, tmp_path, capsys):
    """No flag but method and concept: the documented toy setting, as --toy-recipe, recorded in the report."""
    from diffshield.toyworld.erasure_recipes import toy_erasure

    for method in ("uce", "rece"):
        rep = tmp_path / f"{method}.json"
        assert main(["erase", "--method", method, "--model", str(tiny_sd_dir), "--concept", "wedge",
                     "--out", str(tmp_path / method), "--json", str(rep)]) == 0
        report = json.loads(rep.read_text())
        prompts, cfg = toy_erasure(method, "triangle")
        assert report["defaults"]["source"] == "toy" and report["defaults"]["concept"] == "triangle"
        assert report["prompts"] == prompts
        saved = report["config"] if method == "uce" else report["config"]["uce"]
        assert saved["guides"] == (cfg if method == "uce" else cfg.uce).guides and saved["erase_scale"] == 3.0
    capsys.readouterr()
    rc = main(["erase", "--method", "uce", "--model", str(tiny_sd_dir), "--concept", "hexagon",
               "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "hexagon" in err and "circle, disc" in err and "wedge" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


@pytest.fixture()
def not_toy(monkeypatch):
    """Treat every model as a non-toy model (the tiny test pipeline shares the toy vocabulary)."""
    import diffshield.toyworld.erasure_recipes as recipes

    monkeypatch.setattr(recipes, "is_toy_model", lambda spec: False)


def test_plain_erase_on_another_model_uses_the_object_preset(tiny_sd_dir, tmp_path, not_toy):
    rep = tmp_path / "r.json"
    assert main(["erase", "--method", "rece", "--model", str(tiny_sd_dir), "--concept", "star",
                 "--out", str(tmp_path / "r"), "--json", str(rep)]) == 0
    report = json.loads(rep.read_text())
    cfg = report["config"]
    assert report["defaults"]["source"] == "preset" and report["defaults"]["preset"] == "object"
    assert (cfg["lamb_r"], cfg["epochs"], cfg["lamb2"], cfg["preserve_scale"]) == (1e-3, 1, 0.1, 0.1)
    assert cfg["round_preserve"] == [""] and cfg["round_empty_per_concept"] is False
    assert cfg["uce"]["guides"] == [" "] and cfg["uce"]["preserve_scale"] == "auto"
    assert cfg["uce"]["technique"] == "replace" and cfg["uce"]["lamb"] == 0.5


def test_rece_style_preset_keeps_its_guide_with_preserve_and_rounds_preserve_the_list(tiny_sd_dir, tmp_path,
                                                                                       not_toy):
    listing = tmp_path / "artists.txt"
    listing.write_text("# other artists\ncircle\n\nsquare\n")
    rep = tmp_path / "s.json"
    assert main(["erase", "--method", "rece", "--preset", "style", "--model", str(tiny_sd_dir), "--concept", "star",
                 "--preserve", "a red box", "--preserve-file", str(listing), "--round-lamb", "0.2",
                 "--out", str(tmp_path / "s"), "--json", str(rep)]) == 0
    cfg = json.loads(rep.read_text())["config"]
    assert cfg["uce"]["guides"] == ["art"]  # --preserve no longer replaces the preset's guide
    assert cfg["uce"]["preserve"] == ["a red box", "circle", "square"]
    assert cfg["round_preserve"] == ["", "a red box", "circle", "square"] and cfg["lamb2"] == 0.2
    assert (cfg["lamb_r"], cfg["epochs"]) == (1e-3, 1)

    rep = tmp_path / "n.json"
    assert main(["erase", "--method", "rece", "--preset", "nudity", "--model", str(tiny_sd_dir), "--concept", "star",
                 "--concept", "circle", "--round-preserve", "square", "--rece-variant", "surrogate",
                 "--surrogate-item", "both", "--round-empty", "once", "--epochs", "1",
                 "--out", str(tmp_path / "n"), "--json", str(rep)]) == 0
    cfg = json.loads(rep.read_text())["config"]
    assert cfg["round_preserve"] == ["", "square"] and cfg["round_empty_per_concept"] is False
    assert (cfg["variant"], cfg["surrogate_item"], cfg["lamb_r"], cfg["epochs"]) == ("surrogate", "both", 0.1, 1)


def test_uce_official_options_reach_the_config(tiny_sd_dir, tmp_path, not_toy):
    rep = tmp_path / "u.json"
    assert main(["erase", "--method", "uce", "--model", str(tiny_sd_dir), "--concept", "star", "--preset", "style",
                 "--technique", "tensor", "--expand-prompts", "art", "--preserve-scale", "auto", "--preserve", "box",
                 "--out", str(tmp_path / "u"), "--json", str(rep)]) == 0
    report = json.loads(rep.read_text())
    cfg = report["config"]
    assert (cfg["technique"], cfg["expand_prompts"], cfg["preserve_scale"], cfg["guides"]) == (
        "tensor", "art", "auto", ["art"])
    assert "UCE style" in report["defaults"]["summary"]
    # the summary is the preset's own line; the flags that change it are named after it (the guide stays the
    # preset's 'art' here, and the report says which flags were given)
    assert report["defaults"]["flags"] == ["--preserve 'box'", "--expand-prompts 'art'",
                                           "--preserve-scale 'auto'", "--technique 'tensor'"]
    assert report["defaults"]["summary"].endswith("; with " + ", ".join(report["defaults"]["flags"]))


def test_the_printed_setting_names_the_flags_that_change_it(tiny_sd_dir, tmp_path, not_toy, capsys):
    rep = tmp_path / "g.json"
    assert main(["erase", "--method", "uce", "--model", str(tiny_sd_dir), "--concept", "star", "--guide", "circle",
                 "--lamb", "0.3", "--out", str(tmp_path / "g"), "--json", str(rep)]) == 0
    banner = capsys.readouterr().out.splitlines()[0]
    assert "guide ' '" in banner and banner.endswith("; with --guide 'circle', --lamb 0.3 ...")
    report = json.loads(rep.read_text())
    assert report["config"]["guides"] == ["circle"] and report["config"]["lamb"] == 0.3
    rep = tmp_path / "p.json"
    assert main(["erase", "--method", "uce", "--model", str(tiny_sd_dir), "--concept", "star",
                 "--out", str(tmp_path / "p"), "--json", str(rep)]) == 0
    assert "flags" not in json.loads(rep.read_text())["defaults"]  # the preset as it is


def test_unsafe_preset_erases_the_i2p_categories(tiny_sd_dir, tmp_path, not_toy):
    from diffshield.erase.presets import UNSAFE_CONCEPTS

    rep = tmp_path / "u.json"
    assert main(["erase", "--method", "uce", "--model", str(tiny_sd_dir), "--concept", "unsafe", "--preset",
                 "unsafe", "--out", str(tmp_path / "u"), "--json", str(rep)]) == 0
    assert json.loads(rep.read_text())["prompts"] == list(UNSAFE_CONCEPTS) and len(UNSAFE_CONCEPTS) == 11


def test_select_epoch_keeps_the_best_rece_epoch(tiny_sd_dir, tmp_path):
    rep = tmp_path / "r.json"
    assert main(["erase", "--method", "rece", "--model", str(tiny_sd_dir), "--concept", "red", "--epochs", "2",
                 "--select-epoch", "toy", "--out", str(tmp_path / "r"), "--json", str(rep)]) == 0
    report = json.loads(rep.read_text())
    scores = [e["score"] for e in report["rece_epochs"]]
    assert len(scores) == 3 and all(0 <= s <= 1 for s in scores)
    assert report["best_epoch"] == scores.index(min(scores))
    assert report["config"]["select"].startswith("toy_select")


def test_plain_command_on_toy_t2i_resolves_to_the_benchmarked_toy_setting():
    """The acceptance rows: plain 'diffshield erase --method M --model toy:t2i --concept C' is the toy setting."""
    import dataclasses

    from diffshield.cli.erase import resolve_erase_settings
    from diffshield.cli.main import build_parser
    from diffshield.toyworld.erasure_recipes import toy_erasure

    for method in ("uce", "rece", "esd-x", "esd-u"):
        for concept in ("triangle", "striped", "red"):
            args = build_parser().parse_args(["erase", "--method", method, "--model", "toy:t2i", "--concept",
                                              concept, "--out", "unused"])
            prompts, cfg, defaults = resolve_erase_settings(args)
            ref_prompts, ref = toy_erasure(method, concept)
            as_dict = lambda c: c.to_dict() if hasattr(c, "to_dict") else dataclasses.asdict(c)  # noqa: E731
            assert prompts == ref_prompts and as_dict(cfg) == as_dict(ref) and defaults["source"] == "toy"


def test_an_edit_that_moves_nothing_says_so(tiny_sd_dir, tmp_path, capsys):
    """A preservation weight that outweighs the edit leaves the layers as they were; the summary said "2.27% of UNet
    parameters changed" all the same. A real edit draws no warning."""
    base = ["erase", "--model", str(tiny_sd_dir), "--method", "uce", "--concept", "triangle"]
    assert main([*base, "--lamb", "1e300", "--out", str(tmp_path / "noop")]) == 0
    assert "the edit left its layers as they were" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "real")]) == 0
    assert "left its layers" not in capsys.readouterr().err
