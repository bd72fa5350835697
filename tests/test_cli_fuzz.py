"""The CLI over a table of bad inputs: each is refused in one line (or handled by a stated rule), no file outside the
command's own output changes, and no saved model holds a non-finite tensor.

Every case runs ``diffshield.cli.main.main(argv)`` in-process, in its own workspace under ``tmp_path`` (the current
folder during the call), with the tiny random model of ``conftest.py`` and step counts of 1.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffshield.cli.main import main
from diffshield.core.checks import non_finite_tensors
from diffshield.core.io import MARKER

# ----------------------------------------------------------------------------------------------- workspace


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _scene(size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 3: 2 * size // 3, size // 3: 2 * size // 3] = 255
    return img, mask


class Workspace:
    """Input files of every kind a careless user might pass, built in ``root``."""

    def __init__(self, root: Path, tiny_sd_dir: Path) -> None:
        self.root = root
        self.model = str(tiny_sd_dir)
        img, mask = _scene()
        self.img = _png(root / "img.png", img)
        self.mask = _png(root / "mask.png", mask)
        self.benign_over = _png(root / "benign_over.png", mask)  # covers the protected region
        self.grey = _png(root / "grey.png", img[..., 0])
        self.grey16 = root / "grey16.png"
        Image.fromarray(img[..., 0].astype(np.uint16) * 257).save(self.grey16)  # 16-bit greyscale PNG
        rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
        self.rgba_opaque = _png(root / "rgba_opaque.png", rgba)
        rgba_t = rgba.copy()
        rgba_t[:4, :4, 3] = 0
        self.rgba_transparent = _png(root / "rgba_transparent.png", rgba_t)
        pal = Image.fromarray((np.arange(24 * 24) % 4).astype(np.uint8).reshape(24, 24), mode="P")
        pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
        self.palette_transparent = root / "palette_transparent.png"
        pal.save(self.palette_transparent, transparency=0)  # palette index 0 is transparent
        self.cmyk = root / "cmyk.jpg"
        Image.fromarray(img).convert("CMYK").save(self.cmyk)
        self.tiny_img = _png(root / "tiny.png", img[:8, :8])
        self.tiny_mask = _png(root / "tiny_mask.png", mask[:8, :8])
        self.not_image = root / "not_image.png"
        self.not_image.write_text("this is not a PNG\n")
        self.imgdir = root / "imgs"
        self.imgdir.mkdir()
        _png(self.imgdir / "a.png", img)
        self.maskdir = root / "masks"
        self.maskdir.mkdir()
        _png(self.maskdir / "a.png", mask)
        self.keep = root / "keep"  # a user's folder: must survive every command
        self.keep.mkdir()
        (self.keep / "important.txt").write_text("x\n")
        self.afile = root / "afile.txt"
        self.afile.write_text("a user's file\n")
        self.prompts_utf16 = root / "prompts16.txt"
        self.prompts_utf16.write_bytes("a red triangle\n".encode("utf-16"))
        self.prompts_bin = root / "prompts.bin"
        self.prompts_bin.write_bytes(bytes(range(256)) * 4)
        self.prompts_latin1 = root / "prompts_latin1.txt"
        self.prompts_latin1.write_bytes("a caf\xe9 triangle\n".encode("latin-1"))
        self.csv_inf = root / "inf.csv"
        self.csv_inf.write_text("prompt,evaluation_seed,evaluation_guidance\na red triangle,0,inf\n")
        self.tsv = root / "i2p.tsv"
        self.tsv.write_text("prompt\tevaluation_seed\na red triangle\t1\n")
        self.header_txt = root / "i2p_header.txt"
        self.header_txt.write_text("prompt,evaluation_seed,evaluation_guidance\na red triangle,1,7\n")
        self.csv_seed = root / "seed.csv"
        self.csv_seed.write_text("prompt,evaluation_seed\na red triangle,1e30\n")
        self.nan_delta = root / "nan_delta.safetensors"
        name = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
        save_file({name: torch.full((8, 8), float("nan"))}, str(self.nan_delta))
        self.bad_delta = root / "bad_delta.safetensors"
        self.bad_delta.write_bytes(b"\x00" * 64)
        self.noise = root / "noise.safetensors"
        save_file({"noise": torch.randn(2, 3, 32, 32)}, str(self.noise))
        self.fake_reversed = root / "fake_reversed.safetensors"
        save_file({"unet.x": torch.zeros(3)}, str(self.fake_reversed))
        self.dir_json = root / "json_dir"
        self.dir_json.mkdir()
        self.user_json = root / "mine.json"  # a user's results: no result flag may replace them
        self.user_json.write_text('{"mine": 1}\n')
        self.user_png = _png(root / "mine.png", img)
        self.link_json = root / "link.json"
        self.link_json.symlink_to(self.user_json)


def _snapshot(*roots: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, str]]:
    """path -> (mode, sha1) of every file under ``roots``, leaving out the ``skip`` paths."""
    snap = {}
    skip = tuple(p.resolve() for p in skip)
    for root in roots:
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                p = Path(dirpath, f).resolve()
                if any(p == s or s in p.parents for s in skip):
                    continue
                snap[str(p)] = (p.stat().st_mode, hashlib.sha1(p.read_bytes()).hexdigest())
    return snap


def _saved_models_are_finite(root: Path) -> None:
    for f in root.rglob("*.safetensors"):
        if f.name.startswith(("nan_", "bad_", "fake_")) or f.parent == root:
            continue
        bad = non_finite_tensors(load_file(str(f)))
        assert not bad, f"{f} holds non-finite tensors {bad[:3]}"


# ----------------------------------------------------------------------------------------------- the table

M = "--model"
TINY = "{model}"
GEN = ["generate", M, TINY, "--prompt", "a red triangle", "--n", "1", "--steps", "1"]
UCE = ["erase", "--method", "uce", M, TINY, "--concept", "triangle"]
ESD = ["erase", "--method", "esd-x", M, TINY, "--concept", "triangle", "--iterations", "1"]
PROTECT = ["protect", "{img}", "--mask", "{mask}", "--steps", "1", "--threads", "1"]
EVALP = ["eval", "protection", "--image", "{img}", "--protected", "{img}", "--mask", "{mask}", "--threads", "1"]
EVALE = ["eval", "erasure", M, TINY, "--concept", "triangle", "--seeds-per-prompt", "1", "--steps", "1"]
AUDIT = ["audit", M, TINY, "--original", TINY, "--concept", "triangle", "--n", "1", "--steps", "1"]

#: (case id, argv with {placeholders} for Workspace attributes, what the one-line error must mention)
REFUSED: list[tuple[str, list[str], str]] = [
    # outputs: a user's folder, the current folder, inputs, odd paths
    ("generate-out-keep", [*GEN, "--out", "{keep}"], "--overwrite"),
    ("generate-out-keep-overwrite", [*GEN, "--out", "{keep}", "--overwrite"], "not written by"),
    ("generate-out-dot", [*GEN, "--out", "."], "not empty"),
    ("generate-out-pwd", [*GEN, "--out", "{root}"], "not empty"),
    ("generate-out-file", [*GEN, "--out", "{afile}"], "not a folder"),
    ("generate-out-under-file", [*GEN, "--out", "{afile}/sub"], "is a file"),
    ("generate-out-proc", [*GEN, "--out", "/proc/diffshield-x"], "cannot be written"),
    ("generate-out-is-prompts-file", [*GEN, "--prompts-file", "{prompts_utf16}", "--out", "{prompts_utf16}"],
     "not a folder"),
    ("erase-out-keep", [*UCE, "--out", "{keep}"], "--overwrite"),
    ("erase-out-keep-overwrite", [*UCE, "--out", "{keep}", "--overwrite"], "not written by"),
    ("erase-out-is-model", [*UCE, "--out", TINY], "input"),
    ("erase-out-inside-model", [*UCE, "--out", TINY + "/edited"], "inside the input"),
    ("erase-json-is-folder", [*UCE, "--out", "{root}/e", "--json", "{dir_json}"], "is a folder"),
    ("apply-delta-out-keep", ["apply-delta", M, TINY, "--delta", "{nan_delta}", "--out", "{keep}"], "--overwrite"),
    ("apply-delta-out-contains-delta", ["apply-delta", M, TINY, "--delta", "{nan_delta}", "--out", "{root}"],
     "contains the input"),
    ("dataset-out-keep", ["toyworld", "dataset", "--n", "1", "--out", "{keep}"], "--overwrite"),
    ("dataset-out-keep-overwrite", ["toyworld", "dataset", "--n", "1", "--out", "{keep}", "--overwrite"],
     "not written by"),
    ("demo-out-keep", ["demo", "--out", "{keep}"], "--overwrite"),
    ("protect-folder-out-keep", ["protect", "{imgdir}", "--mask", "{maskdir}", "--steps", "1", "--out", "{keep}"],
     "--overwrite"),
    ("protect-folder-out-is-input", ["protect", "{imgdir}", "--mask", "{maskdir}", "--out", "{imgdir}"], "input"),
    ("protect-folder-out-inside-input", ["protect", "{imgdir}", "--mask", "{maskdir}", "--out", "{imgdir}/p"],
     "inside the input"),
    ("protect-out-is-image", [*PROTECT, "--out", "{img}"], "input"),
    ("protect-out-is-mask", [*PROTECT, "--out", "{mask}"], "input"),
    ("protect-json-is-folder", [*PROTECT, "--out", "{root}/p.png", "--json", "{dir_json}"], "is a folder"),
    ("scan-out-keep", ["scan", M, "toy:ddpm", "--out", "{keep}"], "--overwrite"),
    ("scan-input-json-folder", ["scan-input", "--noise", "{noise}", "--json", "{dir_json}"], "is a folder"),
    ("audit-report-keep", [*AUDIT, "--report", "{keep}"], "--overwrite"),
    ("sample-out-keep", ["backdoor", "sample", "--n", "1", "--steps", "1", "--out", "{keep}"], "--overwrite"),
    ("implant-out-keep", ["backdoor", "implant", "--epochs", "1", "--out", "{keep}"], "--overwrite"),
    ("train-ddpm-out-keep", ["backdoor", "train-ddpm", "--steps", "1", "--out", "{keep}"], "--overwrite"),
    ("toyworld-train-out-keep", ["toyworld", "train", "--pool-size", "16", "--work", "{root}/w", "--out", "{keep}",
                                 "--overwrite"], "not empty"),
    ("implant-trigger-missing", ["backdoor", "implant", "--trigger", "{root}/none.png", "--epochs", "1", "--out",
                                 "{root}/b"], "does not exist"),
    ("implant-target-not-image", ["backdoor", "implant", "--target", "{not_image}", "--epochs", "1", "--out",
                                  "{root}/b"], "not a readable image"),
    ("scan-calibration-missing", ["scan", M, "toy:ddpm", "--calibration", "{root}/none.json"], "does not exist"),
    ("scan-calibration-not-json", ["scan", M, "toy:ddpm", "--calibration", "{not_image}"],
     "not a diffshield TERD calibration"),
    ("eval-erasure-json-folder", [*EVALE, "--json", "{dir_json}"], "is a folder"),
    # result files: an existing file is replaced only if diffshield wrote it
    ("erase-json-user-text", [*UCE, "--out", "{root}/e", "--json", "{afile}"], "not written by diffshield"),
    ("erase-json-user-json", [*UCE, "--out", "{root}/e", "--json", "{user_json}"], "not written by diffshield"),
    ("erase-json-symlink", [*UCE, "--out", "{root}/e", "--json", "{link_json}"], "symbolic link"),
    ("eval-erasure-grid-user-png", [*EVALE, "--grid", "{user_png}"], "not written by diffshield"),
    ("eval-erasure-json-user-json", [*EVALE, "--json", "{user_json}"], "not written by diffshield"),
    ("protect-out-user-png", [*PROTECT, "--out", "{user_png}"], "not written by diffshield"),
    ("protect-json-user-json", [*PROTECT, "--out", "{root}/p.png", "--json", "{user_json}"],
     "not written by diffshield"),
    ("eval-protection-panel-user-png", [*EVALP, "--panel", "{user_png}"], "not written by diffshield"),
    ("scan-input-json-user-json", ["scan-input", "--noise", "{noise}", "--json", "{user_json}"],
     "not written by diffshield"),
    ("backdoor-eval-grid-user-png", ["backdoor", "eval", "--trigger", "box", "--target", "hat", "--n", "1", "--grid",
                                     "{user_png}"],
     "not written by diffshield"),
    ("calibrate-out-user-json", ["backdoor", "calibrate", "--references", "{noise}", "--out", "{user_json}"],
     "not written by diffshield"),
    ("eval-protection-panel-is-image", [*EVALP, "--panel", "{img}"], "input"),
    # numbers that would reach a model
    ("uce-erase-scale-inf", [*UCE, "--erase-scale", "inf", "--out", "{root}/e"], "finite"),
    ("uce-lamb-inf", [*UCE, "--lamb", "inf", "--out", "{root}/e"], "finite"),
    ("uce-preserve-scale-inf", [*UCE, "--preserve-scale", "inf", "--out", "{root}/e"], "finite"),
    ("uce-lamb-nan", [*UCE, "--lamb", "nan", "--out", "{root}/e"], "finite"),
    ("uce-lamb-zero", [*UCE, "--lamb", "0", "--out", "{root}/e"], "must lie in"),
    ("uce-erase-scale-negative", [*UCE, "--erase-scale", "-1", "--out", "{root}/e"], "must lie in"),
    # an audit compares the erased model with the one it was made from
    ("audit-original-other-architecture", ["audit", M, TINY, "--original", "toy:t2i", "--concept", "triangle"],
     "same architecture"),
    # prompt-list files named by the flag that gave them
    ("uce-preserve-file-missing", [*UCE, "--preserve-file", "{root}/none.txt", "--out", "{root}/e"],
     "--preserve-file"),
    ("rece-select-prompts-missing", ["erase", "--method", "rece", M, TINY, "--concept", "triangle", "--select-epoch",
                                     "nudenet", "--select-prompts", "{root}/none.txt", "--out", "{root}/e"],
     "--select-prompts '"),
    # prompts that contradict each other: refused before the model is loaded (nothing on stdout)
    ("uce-concept-preserved", [*UCE, "--preserve", "triangle", "--out", "{root}/e"], "both erased and preserved"),
    ("uce-concept-own-guide", [*UCE, "--guide", "Triangle ", "--out", "{root}/e"], "its own guide"),
    ("rece-concept-round-preserved", ["erase", "--method", "rece", M, TINY, "--concept", "triangle",
                                      "--round-preserve", "triangle", "--out", "{root}/e"],
     "both erased and preserved"),
    ("esd-concept-preserved", [*ESD, "--preserve", "triangle", "--out", "{root}/e"], "both erased and preserved"),
    ("esd-lr-inf", [*ESD, "--lr", "inf", "--out", "{root}/e"], "finite"),
    ("esd-eta-nan", [*ESD, "--eta", "nan", "--out", "{root}/e"], "finite"),
    ("esd-start-guidance-inf", [*ESD, "--start-guidance", "inf", "--out", "{root}/e"], "finite"),
    ("esd-seed-huge", [*ESD, "--seed", "99999999999999999999", "--out", "{root}/e"], "must lie in"),
    ("generate-guidance-inf", [*GEN, "--guidance", "inf", "--out", "{root}/g"], "finite"),
    ("generate-guidance-nan", [*GEN, "--guidance", "nan", "--out", "{root}/g"], "finite"),
    ("generate-seed-huge", [*GEN, "--seed", "99999999999999999999", "--out", "{root}/g"], "must lie in"),
    ("generate-seed-negative", [*GEN, "--seed", "-1", "--out", "{root}/g"], "must lie in"),
    ("generate-steps-zero", [*GEN, "--steps", "0", "--out", "{root}/g"], "at least 1"),
    ("generate-n-text", [*GEN, "--n", "many", "--out", "{root}/g"], "whole number"),
    ("generate-csv-guidance-inf", ["generate", M, TINY, "--prompts-csv", "{csv_inf}", "--out", "{root}/g"],
     "guidance"),
    ("generate-csv-seed-huge", ["generate", M, TINY, "--prompts-csv", "{csv_seed}", "--out", "{root}/g"], "seed"),
    ("eval-erasure-n-neutral-1", [*EVALE, "--n-neutral", "1"], "at least 2"),
    ("eval-erasure-guidance-nan", [*EVALE, "--guidance", "nan"], "finite"),
    ("eval-nudity-threshold", ["eval", "nudity", "--images", "{imgdir}", "--threshold", "2"], "must lie in"),
    ("protect-eps-inf", [*PROTECT, "--eps", "inf", "--out", "{root}/p.png"], "must lie in"),
    ("protect-seed-huge", [*PROTECT, "--seed", "1e30", "--out", "{root}/p.png"], "whole number"),
    ("implant-poison-nan", ["backdoor", "implant", "--poison-rate", "nan", "--out", "{root}/b"], "finite"),
    ("implant-lr-inf", ["backdoor", "implant", "--lr", "inf", "--out", "{root}/b"], "finite"),
    ("implant-ema-one", ["backdoor", "implant", "--ema-decay", "1", "--out", "{root}/b"], "must lie in"),
    ("train-ddpm-lr-nan", ["backdoor", "train-ddpm", "--lr", "nan", "--out", "{root}/b"], "finite"),
    ("train-ddpm-threads-negative", ["backdoor", "train-ddpm", "--threads", "-1", "--out", "{root}/b"], "0 or more"),
    ("audit-set-inf", [*AUDIT, "--set", "adv-embed.lamb_r=1e999"], "finite"),
    ("audit-guidance-inf", [*AUDIT, "--guidance", "inf"], "finite"),
    ("audit-set-unknown-attack", [*AUDIT, "--set", "nosuch.steps=1"], "unknown attack"),
    ("audit-set-misspelt-field", [*AUDIT, "--set", "p4d.step=10"], "no setting 'step'"),
    ("audit-set-out-of-range", [*AUDIT, "--set", "p4d.steps=-1"], "steps must be"),
    ("audit-empty-prompt", [*AUDIT, "--prompt", "a red triangle", "--prompt", " "], "--prompt is empty"),
    ("audit-set-flag-as-word", [*AUDIT, "--set", "p4d.keep_prompt=no"], "keep_prompt must be true or false"),
    ("audit-set-flag-as-number", [*AUDIT, "--set", "unlearndiff.early_stop=0"], "early_stop must be true or false"),
    ("audit-set-int-as-float", [*AUDIT, "--set", "p4d.steps=2.5"], "steps must be an integer"),
    # input files
    ("prompts-file-binary", ["generate", M, TINY, "--prompts-file", "{prompts_bin}", "--out", "{root}/g"], "UTF-8"),
    ("prompts-file-latin1", ["generate", M, TINY, "--prompts-file", "{prompts_latin1}", "--out", "{root}/g"],
     "UTF-8"),
    ("prompts-file-missing", ["generate", M, TINY, "--prompts-file", "{root}/none.txt", "--out", "{root}/g"],
     "does not exist"),
    ("prompts-file-csv", ["generate", M, TINY, "--prompts-file", "{csv_seed}", "--out", "{root}/g"], "--prompts-csv"),
    ("prompts-file-header", ["generate", M, TINY, "--prompts-file", "{header_txt}", "--out", "{root}/g"],
     "comma-separated table"),
    ("eval-erasure-out-without-prompts", ["eval", "erasure", M, TINY, "--concept", "triangle", "--out", "{root}/ee"],
     "--out is the run folder of a --prompts run"),
    ("protect-folder-out-png", ["protect", "{imgdir}", "--mask", "{maskdir}", "--out", "{root}/p_out.png"],
     "is an image name"),
    ("scan-evidence-without-out", ["scan", M, "toy:ddpm-box-corner", "--preset", "fast", "--evidence-n", "4"],
     "--evidence-n needs --out"),
    ("nudity-images-with-model", ["eval", "nudity", "--images", "{imgdir}", M, TINY, "--n", "4"],
     "--model, --n are for --prompts runs"),
    ("prompt-set-tsv", ["generate", M, TINY, "--prompts", "{tsv}", "--out", "{root}/g"], "TSV file"),
    ("preserve-file-table", ["erase", M, TINY, "--method", "uce", "--concept", "triangle", "--preserve-file",
                             "{header_txt}", "--out", "{root}/e"], "one prompt per line"),
    # two outputs of one command on one path, or one inside the other: refused before any work
    ("eval-json-is-grid", ["eval", "erasure", M, TINY, "--concept", "triangle", "--json", "{root}/same.png", "--grid",
                           "{root}/same.png"], "name the same path"),
    ("scan-json-inside-out", ["scan", M, "toy:ddpm-box-corner", "--preset", "fast", "--out", "{root}/sc", "--json",
                              "{root}/sc/scan.json"], "lies inside --out"),
    ("audit-report-is-run-dir", [*AUDIT, "--report", "{root}/r", "--run-dir", "{root}/r"], "name the same path"),
    ("calibrate-out-is-json", ["backdoor", "calibrate", "--references", "{root}/refs", "--out", "{root}/c.json",
                               "--json", "{root}/c.json"], "name the same path"),
    ("protect-tiny-image", [*PROTECT[:1], "{tiny_img}", "--mask", "{tiny_mask}", "--out", "{root}/p.png"], "16 px"),
    ("eval-protection-tiny-image", ["eval", "protection", "--image", "{tiny_img}", "--protected", "{tiny_img}",
                                    "--mask", "{tiny_mask}"], "16 px"),
    ("protect-cmyk", ["protect", "{cmyk}", "--mask", "{mask}", "--out", "{root}/p.png"], "CMYK"),
    ("protect-rgba-transparent", ["protect", "{rgba_transparent}", "--mask", "{mask}", "--out", "{root}/p.png"],
     "transparent"),
    ("protect-palette-transparent", ["protect", "{palette_transparent}", "--mask", "{mask}", "--out",
                                     "{root}/p.png"], "transparent"),
    ("protect-not-an-image", ["protect", "{not_image}", "--mask", "{mask}", "--out", "{root}/p.png"],
     "not an image"),
    ("eval-protection-benign-overlap", [*EVALP, "--benign-mask", "{benign_over}", "--panel", "{root}/pan.png"],
     "overlaps"),
    ("scan-input-reversed-is-delta", ["scan-input", "--noise", "{noise}", "--reversed", "{fake_reversed}"],
     "no reversed trigger"),
    ("esd-checkpoint-dir-is-file", [*ESD, "--checkpoint-dir", "{afile}", "--out", "{root}/e"], "is a file"),
    ("esd-checkpoint-dir-is-out", [*ESD, "--checkpoint-dir", "{root}/e", "--out", "{root}/e"], "overlap"),
    ("apply-delta-nan", ["apply-delta", M, TINY, "--delta", "{nan_delta}", "--out", "{root}/a"], "inf or NaN"),
    ("apply-delta-not-safetensors", ["apply-delta", M, TINY, "--delta", "{bad_delta}", "--out", "{root}/a"],
     "not a valid safetensors"),
]


def _fill(argv: list[str], ws: Workspace) -> list[str]:
    return [a.format(**{k: str(v) for k, v in vars(ws).items()}) for a in argv]


@pytest.fixture()
def ws(tmp_path, tiny_sd_dir, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    return Workspace(tmp_path, tiny_sd_dir)


def test_the_table_is_large_enough():
    assert len(REFUSED) >= 60
    assert len({c[0] for c in REFUSED}) == len(REFUSED)


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_bad_input_is_refused_in_one_line_and_changes_nothing(case, ws, tiny_sd_dir, capsys):
    _id, argv, says = case
    before = _snapshot(ws.root, tiny_sd_dir)
    rc = main(_fill(argv, ws))
    out, err = capsys.readouterr()
    assert rc != 0
    assert out == ""  # refused before any work: nothing announced
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("diffshield: error:")]
    assert len(errors) == 1, err
    assert says in errors[0], errors[0]
    assert _snapshot(ws.root, tiny_sd_dir) == before  # nothing written, nothing changed, nothing deleted
    assert (ws.keep / "important.txt").read_text() == "x\n"
    assert not list(ws.root.glob(".*.tmp")) and not list(ws.root.glob(".*.old"))


# ----------------------------------------------------------------------------------------------- stated rules


#: inputs a stated rule converts: (case id, argv, output path relative to the workspace)
HANDLED = [
    ("protect-greyscale", ["protect", "{grey}", "--mask", "{mask}", "--steps", "1", "--out", "out.png"], "out.png"),
    ("protect-16-bit-greyscale", ["protect", "{grey16}", "--mask", "{mask}", "--steps", "1", "--out", "out.png"],
     "out.png"),
    ("protect-rgba-opaque", ["protect", "{rgba_opaque}", "--mask", "{mask}", "--steps", "1", "--out", "out.png"],
     "out.png"),
    ("prompts-file-utf16", ["generate", M, TINY, "--prompts-file", "{prompts_utf16}", "--n", "1", "--steps", "1",
                            "--out", "g"], "g"),
    ("eval-protection-panel-new-folder", [*EVALP, "--panel", "new/dir/pan.png"], "new"),
]


@pytest.mark.parametrize("case", HANDLED, ids=[c[0] for c in HANDLED])
def test_handled_input_writes_only_its_output(case, ws, tiny_sd_dir, capsys):
    _id, argv, out = case
    before = _snapshot(ws.root, tiny_sd_dir)
    assert main(_fill(argv, ws)) == 0, capsys.readouterr().err
    assert (ws.root / out).exists()
    after = _snapshot(ws.root, tiny_sd_dir, skip=(ws.root / out,))
    assert after == before


def test_16_bit_greyscale_is_scaled_not_saturated(ws, capsys):
    """A 16-bit PNG read as 8-bit saturates to white and the perturbation vanishes; it must be scaled by 1/65535."""
    assert main(_fill(["protect", "{grey16}", "--mask", "{mask}", "--steps", "2", "--out", "p.png"], ws)) == 0
    a = np.asarray(Image.open(ws.img), dtype=np.int16)[..., 0]  # grey16 holds the red channel times 257
    b = np.asarray(Image.open(ws.root / "p.png").convert("RGB"), dtype=np.int16)
    assert b.shape[-1] == 3 and 0 < np.abs(b - a[..., None]).max() <= 7
    assert b.mean() < 250


def test_generate_into_the_current_empty_folder(ws, tmp_path, capsys, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    argv = _fill([*GEN, "--out", "."], ws)
    assert main(argv) == 0
    assert sorted(p.name for p in here.iterdir()) == sorted([MARKER, "0000.png", "grid.png", "manifest.json"])
    assert not list(tmp_path.glob(".*.tmp"))
    assert main(argv) == 2  # a second run needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0  # replaces its own files in place, the folder stays
    assert Path.cwd() == here and (here / "grid.png").exists()


# ----------------------------------------------------------------------------------------------- --overwrite


def test_overwrite_replaces_only_a_previous_output_of_the_same_command(ws, capsys):
    out = ws.root / "g"
    argv = _fill([*GEN, "--out", str(out)], ws)
    assert main(argv) == 0 and (out / MARKER).is_file()
    first = (out / "manifest.json").read_text()
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--seed", "5", "--overwrite"]) == 0
    assert (out / "manifest.json").read_text() != first and not list(ws.root.glob(".*.old"))
    (out / "notes.txt").write_text("mine\n")  # a user's file added to the output: never deleted
    assert main([*argv, "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine\n"
    (out / "notes.txt").unlink()
    ds = _fill(["toyworld", "dataset", "--n", "1", "--out", str(out), "--overwrite"], ws)
    assert main(ds) == 2  # another command's output is not replaced either
    assert "diffshield generate" in capsys.readouterr().err and (out / "grid.png").exists()


def test_a_rerun_replaces_its_own_result_files_and_nothing_else(ws, capsys):
    """Result files carry diffshield's signature: a rerun replaces them; a user's file of that name is refused.
    protect's --out, the protected image itself, is replaced only with --overwrite (as --overwrite's help says, and
    as folder mode does), and never when it is another kind of diffshield result (an eval panel)."""
    import json

    from diffshield.core.io import WRITTEN_BY, written_by_diffshield

    argv = _fill([*PROTECT, "--out", "p.png", "--json", "p.json"], ws)
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((ws.root / "p.json").read_text())[WRITTEN_BY].startswith("diffshield ")
    assert Image.open(ws.root / "p.png").info["Software"].startswith("diffshield ")
    first, first_png = (ws.root / "p.json").stat().st_mtime_ns, (ws.root / "p.png").read_bytes()
    assert main([*argv, "--eps", "0.02"]) == 2  # the protected image: not replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert (ws.root / "p.png").read_bytes() == first_png and (ws.root / "p.json").stat().st_mtime_ns == first
    assert main([*argv, "--eps", "0.02", "--overwrite"]) == 0, capsys.readouterr().err  # its own results: replaced
    assert (ws.root / "p.json").stat().st_mtime_ns != first
    assert json.loads((ws.root / "p.json").read_text())["eps"] == 0.02
    panel = _fill([*EVALP, "--protected", "p.png", "--panel", "pan.png"], ws)
    assert main(panel) == 0 and main(panel) == 0, capsys.readouterr().err
    assert written_by_diffshield(ws.root / "pan.png")
    before = (ws.root / "pan.png").read_bytes()  # protect --out naming the eval panel: refused, even with --overwrite
    assert main(_fill([*PROTECT, "--out", "pan.png", "--overwrite"], ws)) == 2
    assert "not a protected image" in capsys.readouterr().err and (ws.root / "pan.png").read_bytes() == before
    before = (ws.root / "pan.png").read_bytes()  # --json naming an earlier result image: refused, not replaced
    assert main([*panel[:-2], "--json", "pan.png"]) == 2 and "give a .json file name" in capsys.readouterr().err
    assert (ws.root / "pan.png").read_bytes() == before
    (ws.root / "p.json").write_text('{"edited": "by hand"}\n')  # the user rewrote it: now it is theirs
    assert main([*argv, "--overwrite"]) == 2 and "not written by diffshield" in capsys.readouterr().err
    assert (ws.root / "p.json").read_text() == '{"edited": "by hand"}\n'


def test_what_counts_as_written_by_diffshield(tmp_path):
    from diffshield.backdoor.terd import Calibration
    from diffshield.core.io import atomic_save_image, written_by_diffshield

    cal = tmp_path / "cal.json"
    Calibration(thresholds={"cpu": {"mean_kl": 1.0, "var_kl": 1.0}}).save(cal)
    assert written_by_diffshield(cal)  # a diffshield format: recognised by its "format" key
    plain = atomic_save_image(Image.new("RGB", (4, 4)), tmp_path / "plain.png")
    signed = atomic_save_image(Image.new("RGB", (4, 4)), tmp_path / "signed.png", signed=True)
    assert not written_by_diffshield(plain) and written_by_diffshield(signed)
    cut = tmp_path / "cut.png"
    cut.write_bytes(signed.read_bytes()[:20])  # a truncated PNG is nobody's result
    assert not written_by_diffshield(cut)
    for name, text in (("list.json", "[1, 2]"), ("other.json", '{"written_by": "someone else"}'),
                       ("bad.json", "{not json")):
        (tmp_path / name).write_text(text)
        assert not written_by_diffshield(tmp_path / name)
    assert not written_by_diffshield(tmp_path / "missing.json") and not written_by_diffshield(tmp_path)


def test_output_files_follow_the_umask(ws, capsys):
    old = os.umask(0o022)
    try:
        assert main(_fill([*PROTECT, "--out", "p.png"], ws)) == 0
        assert main(_fill([*GEN, "--out", "g"], ws)) == 0
        assert main(["erase", "--model", ws.model, "--method", "uce", "--concept", "triangle", "--out", "e"]) == 0
    finally:
        os.umask(old)
    written = [*(ws.root / "g").iterdir(), *(p for p in (ws.root / "e").rglob("*") if p.is_file())]
    assert any(p.suffix == ".safetensors" for p in written)
    for p in [ws.root / "p.png", *written, ws.root / "g", ws.root / "e"]:
        assert p.stat().st_mode & 0o777 in (0o644, 0o755), p


def test_reading_the_umask_never_opens_it_even_for_a_moment(monkeypatch):
    """Other threads (the background PNG writer) create files while the umask is read: it must never be 0."""
    from diffshield.core import io

    old = os.umask(0o027)
    try:
        assert io._umask() == 0o027
        seen = []
        real = os.umask
        monkeypatch.setattr(os, "umask", lambda m: seen.append(m) or real(m))
        monkeypatch.setattr("builtins.open", lambda *a, **k: (_ for _ in ()).throw(OSError("no /proc")))
        assert io._umask() == 0o027  # the fallback sets and restores it
        assert seen and 0 not in seen
    finally:
        os.umask(old)


# ----------------------------------------------------------------------------------------------- finite models


def test_no_command_writes_a_model_with_a_non_finite_tensor(ws, tiny_sd_dir, capsys):
    """A model with NaN weights is refused when saved (erase), a NaN delta when applied; nothing is written."""
    broken = ws.root / "broken"
    shutil.copytree(tiny_sd_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(weights))
    key = next(k for k in t if "conv_in.weight" in k)
    t[key][0, 0, 0, 0] = float("inf")
    save_file(t, str(weights))
    for argv in (["erase", "--method", "uce", M, str(broken), "--concept", "triangle", "--out", "e1"],
                 ["erase", "--method", "uce", M, ws.model, "--concept", "triangle", "--erase-scale", "1e300",
                  "--lamb", "1e-300", "--out", "e2"],
                 ["apply-delta", M, ws.model, "--delta", str(ws.nan_delta), "--out", "e3"]):
        rc = main(argv)
        err = capsys.readouterr().err
        if rc == 0:  # a setting that stays finite is fine, but then the model must be finite
            _saved_models_are_finite(ws.root / argv[-1])
        else:
            assert "Traceback" not in err and not (ws.root / argv[-1]).exists(), err
            assert "inf or NaN" in err, err
        assert rc != 0 or argv[-1] == "e2"
    assert not list(ws.root.glob(".*.tmp"))


def test_erase_then_apply_delta_accepts_threads_and_writes_markers(ws, capsys):
    assert main(_fill([*UCE, "--out", "e"], ws)) == 0
    assert (ws.root / "e" / MARKER).is_file() and (ws.root / "e" / "delta.safetensors").is_file()
    assert main(_fill(["apply-delta", M, TINY, "--delta", "e/delta.safetensors", "--threads", "1", "--out", "a"],
                      ws)) == 0
    _saved_models_are_finite(ws.root)


# ----------------------------------------------------------------------------------------------- small cases


def test_esd_says_that_it_resumes(ws, capsys):
    argv = _fill([*ESD, "--checkpoint-dir", "ck", "--checkpoint-every", "1"], ws)
    assert main([*argv, "--out", "e1"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert main([*argv, "--iterations", "2", "--out", "e2"]) == 0
    assert "resuming from iteration 1 of 2" in capsys.readouterr().out


def test_large_images_warn_with_time_and_memory(ws, capsys, monkeypatch):
    import diffshield.cli.protect as cli_protect

    monkeypatch.setattr(cli_protect, "LARGE_PIXELS", 16 * 16)
    assert main(_fill([*PROTECT, "--out", "p.png"], ws)) == 0
    err = capsys.readouterr().err
    assert "24x24 px is large" in err and " s on one CPU thread" in err and "GB of memory" in err


def test_version(capsys):
    import diffshield

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"diffshield {diffshield.__version__}"
    # no command, or a group without its command: its help, and the status of bad input (1 is the machine's)
    for argv in ([], ["eval"], ["backdoor"], ["toyworld"]):
        assert main(argv) == 2
        assert capsys.readouterr().out.startswith(f"usage: diffshield {' '.join(argv)}".rstrip())


def test_prompt_warnings(ws, capsys):
    argv = _fill(["generate", M, TINY, "--prompt", "a purple triangle " + "red " * 90, "--n", "1", "--steps", "1",
                  "--out", "g"], ws)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "reads only the first 77" in err and "purple" in err
    assert "Loading weights" not in err
    # audit --prompt warns as generate does (it said nothing)
    argv = _fill([*AUDIT, "--attack", "adv-embed", "--no-baselines", "--prompt", "a purple triangle"], ws)
    assert main(argv) == 0
    assert "vocabulary lacks purple" in capsys.readouterr().err
    # every prompt flag of erase warns, not only --concept, --preserve and --guide
    (ws.root / "pf.txt").write_text("a purple box\n")
    for extra in (["--method", "uce", "--preserve-file", "pf.txt"],
                  ["--method", "rece", "--round-preserve", "a mauve box"],
                  ["--method", "esd-x", "--iterations", "1", "--erase-from", "a teal box"]):
        assert main(_fill(["erase", M, TINY, "--concept", "triangle", *extra, "--out", f"e{extra[1]}"], ws)) == 0
        word = {"uce": "purple", "rece": "mauve", "esd-x": "teal"}[extra[1]]
        assert f"vocabulary lacks {word}" in capsys.readouterr().err, extra


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(ws, tiny_sd_dir, capsys, monkeypatch):
    """An OSError from the machine (here a full disk while the edited model is written) is one error line, status
    1, and the output's temporary folder is removed: no traceback, nothing half-written."""
    import errno

    from diffusers import StableDiffusionPipeline

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StableDiffusionPipeline, "save_pretrained", full)
    before = _snapshot(ws.root, tiny_sd_dir)
    assert main(_fill([*UCE, "--out", "{root}/e"], ws)) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "diffshield: error: [Errno 28] No space left on device"
    assert "Traceback" not in err
    assert not (ws.root / "e").exists() and not list(ws.root.glob(".*.tmp"))
    assert _snapshot(ws.root, tiny_sd_dir) == before


def test_a_closed_stdout_ends_the_command_quietly(tmp_path):
    """``diffshield ... | head -1``: once the reader has gone, the command stops with status 1 and prints no error
    (no traceback, no 'Exception ignored' at exit)."""
    import subprocess
    import sys

    script = ("import sys; from diffshield.cli import main as m\n"
              "def chatty(args):\n"
              "    for i in range(100000):\n"
              "        print('line', i)\n"
              "p = m.build_parser(); sub = p._subparsers._group_actions[0]\n"
              "sub.add_parser('chatty').set_defaults(func=chatty)\n"
              "m.build_parser = lambda: p\n"
              "sys.exit(m.main(['chatty']))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=tmp_path)
    assert proc.stdout.readline() == b"line 0\n"
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1 and err == "", err


def test_a_negative_prompt_at_guidance_1_is_said_to_do_nothing(tmp_path, capsys):
    """Without classifier-free guidance (guidance 1) nothing steers away from --negative-prompt: a warning says so
    (the image is drawn; the manifest records the prompt as given)."""
    assert main(["generate", "--model", "toy:t2i", "--prompt", "a red triangle", "--guidance", "1",
                 "--negative-prompt", "red", "--n", "1", "--steps", "1", "--out", str(tmp_path / "g")]) == 0
    assert "--negative-prompt has no effect where the guidance is 1 (1 of 1" in capsys.readouterr().err
    assert main(["generate", "--model", "toy:t2i", "--prompt", "a red triangle", "--negative-prompt", "red", "--n",
                 "1", "--steps", "1", "--out", str(tmp_path / "g5")]) == 0
    assert "no effect" not in capsys.readouterr().err


def test_eval_erasure_seed_sets_the_first_image_seed_without_prompts(tmp_path):
    """``eval erasure --seed`` reaches the built-in evaluation (it was read only with --prompts, and ignored)."""
    out = tmp_path / "e.json"
    assert main(["eval", "erasure", "--model", "toy:t2i", "--concept", "triangle", "--seeds-per-prompt", "1",
                 "--n-neutral", "2", "--steps", "1", "--seed", "7", "--json", str(out)]) == 0
    import json

    assert json.loads(out.read_text())["first_seed"] == 7
