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
              "backdoor/with_and_without_trigger.png", "backdoor/scan.json", "protect/panel.png"):
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


def test_an_interrupted_demo_leaves_nothing_and_a_rerun_succeeds(tmp_path, monkeypatch, capsys):
    """The demo writes into a temporary folder beside --out, moved into place when every step has finished: an
    interruption (here in the backdoor step) leaves no --out and no temporary folder, a rerun needs no --overwrite,
    and an interrupted --overwrite rerun keeps the previous demo. The printed paths and demo.json name --out. The
    slow parts (models, sampling, every step) are stubbed: only the demo's writing is under test."""
    from types import SimpleNamespace

    import diffshield.cli.main as cli
    from diffshield.cli import backdoor, protect, redteam
    from diffshield.core import loading, sampling
    from diffshield.toyworld import detector

    monkeypatch.setattr(loading, "load_t2i", lambda *a, **k: object())
    monkeypatch.setattr(detector, "load_detector", lambda *a, **k: object())
    monkeypatch.setattr(sampling, "generate", lambda model, prompts, seeds, **k: sampling.Generation(
        torch.rand(len(prompts), 3, 8, 8), seeds, prompts))
    monkeypatch.setattr(detector, "describe", lambda det, images: [SimpleNamespace(
        colour="red", style="plain", shape="triangle", background="white")] * len(images))

    def step(name, interrupt=False):
        def demo_step(out, device="cpu"):
            (out / f"{name}.txt").write_text(name)
            print(f"[{name}] wrote {out / f'{name}.txt'}")
            if interrupt:
                raise KeyboardInterrupt
            return {"file": str(out / f"{name}.txt")}
        return demo_step

    monkeypatch.setattr(cli, "demo_erasure", lambda model, det, out: step("erase")(out))
    monkeypatch.setattr(redteam, "demo_step", step("redteam"))
    monkeypatch.setattr(protect, "demo_step", step("protect"))
    monkeypatch.setattr(backdoor, "demo_step", step("backdoor", interrupt=True))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 130
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written --out, no temporary folder left

    monkeypatch.setattr(backdoor, "demo_step", step("backdoor"))
    capsys.readouterr()
    assert main(["demo", "--out", str(out)]) == 0
    summary = json.loads((out / "demo.json").read_text())
    assert summary["backdoor"]["file"] == str(out / "backdoor" / "backdoor.txt")
    assert summary["erase"]["file"] == str(out / "erase" / "erase.txt")
    assert (out / "protect" / "protect.txt").exists() and (out / "generate" / "grid.png").exists()
    assert (out / ".diffshield-output.json").exists() and [p.name for p in tmp_path.iterdir()] == ["demo"]
    printed = capsys.readouterr().out
    assert f"[redteam] wrote {out / 'redteam' / 'redteam.txt'}" in printed and ".tmp" not in printed, printed
    assert f"summary: {out / 'demo.json'}" in printed

    monkeypatch.setattr(backdoor, "demo_step", step("backdoor", interrupt=True))
    assert main(["demo", "--out", str(out), "--overwrite"]) == 130
    assert json.loads((out / "demo.json").read_text()) == summary and [p.name for p in tmp_path.iterdir()] == ["demo"]
