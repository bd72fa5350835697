"""The success paths of the commands that had none: backdoor train-ddpm and implant, demo and eval nudity, each run
through the CLI and checked for what it promises to write."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from diffshield.cli.main import main


def test_train_ddpm_then_implant_through_the_cli(tmp_path):
    from diffshield.backdoor.ddpm import load_ddpm

    ddpm = tmp_path / "ddpm"
    assert main(["backdoor", "train-ddpm", "--steps", "2", "--batch-size", "2", "--pool-size", "8", "--channels", "8",
                 "16", "--warmup", "1", "--out", str(ddpm)]) == 0
    base = load_ddpm(ddpm)
    assert base.image_shape == (3, 32, 32) and base.info["config"]["steps"] == 2
    bd = tmp_path / "bd"
    assert main(["backdoor", "implant", "--model", str(ddpm), "--epochs", "1", "--pool-size", "8", "--batch-size",
                 "4", "--poison-rate", "0.5", "--out", str(bd)]) == 0
    rec = json.loads((bd / "diffshield.json").read_text())
    assert rec["backdoor"]["trigger"] == "box" and rec["backdoor"]["n_poisoned"] == 4
    assert (bd / "trigger.png").exists() and (bd / "target.png").exists()
    after = load_ddpm(bd)
    assert any(not torch.equal(p, q) for p, q in zip(base.unet.parameters(), after.unet.parameters()))


@pytest.mark.long(195)
def test_demo_through_the_cli(tmp_path, monkeypatch, capsys):
    """``diffshield demo`` writes every pillar's part; the TERD scan runs at a tiny budget here (the demo's own
    figures are in the README)."""
    from diffshield.backdoor import terd

    monkeypatch.setitem(terd.PRESETS, "fast", {"stage1_iters": 2, "stage2_iters": 1, "batch_size": 2,
                                               "ddim_steps": 2})
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--threads", "1"]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert {"generate", "erase", "redteam", "backdoor", "protect"} <= set(summary)
    # UCE at its toy setting on 'triangle' and 'wedge' (32 images from the erase test's prompts and seeds): the bars
    # the docs claim, at most 10 % left and the other shape (circles, 16 images) down at most 5 points
    erase = summary["erase"]
    assert erase["detected_before"] >= 0.9 and erase["detected_after"] <= 0.10, erase
    assert erase["circle_after"] >= erase["circle_before"] - 0.05, erase
    # the shipped backdoored example draws its target from noise + trigger, and not from noise alone
    assert summary["backdoor"]["samples"]["asr_strict_with_trigger"] >= 0.75, summary["backdoor"]["samples"]
    assert summary["backdoor"]["samples"]["asr_without_trigger"] == 0.0, summary["backdoor"]["samples"]
    assert {"backdoored", "mean_kl", "var_kl", "thresholds"} <= set(summary["backdoor"]["example"])
    for f in ("generate/grid.png", "erase/uce-triangle-grid.png", "redteam/audit/index.html",
              "backdoor/backdoor/with_and_without_trigger.png", "backdoor/backdoor/scan.json",
              "protect/protect/panel.png"):
        assert (out / f).exists(), f
    printed = capsys.readouterr().out
    assert "summary:" in printed
    assert "TERD fast scan" in printed and "samples are its target; from noise alone, 0%" in printed


def test_eval_nudity_through_the_cli(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 120, 200)).save(images / f"{i}.png")
    report = tmp_path / "nudity.json"
    assert main(["eval", "nudity", "--images", str(images), "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["n_images"] == 2 and r["nudity_rate"] == 0.0
