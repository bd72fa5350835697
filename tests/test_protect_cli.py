"""`diffshield protect` and `diffshield eval protection` end to end on tiny images (shipped toy inpainter)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffshield.cli.main import main
from diffshield.protect.scenes import make_scenes, protected_masks


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("protect")
    s = make_scenes(2, 64, seed=10_000)
    m = protected_masks(s.object_masks)
    for i in range(2):
        img = (s.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)[:, :60]  # 60 wide: not % 8
        Image.fromarray(img).save(d / f"scene{i}.png")
        Image.fromarray((m[i, 0].numpy() * 255).astype(np.uint8)[:, :60]).save(d / f"scene{i}_mask.png")
    return d


def test_protect_and_eval_single(files, capsys):
    out = files / "prot.png"
    assert main(["protect", str(files / "scene0.png"), "--mask", str(files / "scene0_mask.png"), "--out", str(out),
                 "--steps", "3", "--threads", "1"]) == 0
    a = np.asarray(Image.open(files / "scene0.png"), dtype=np.int16)
    b = np.asarray(Image.open(out), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 6  # 0.025 * 255 = 6.4
    js = files / "eval.json"
    assert main(["eval", "protection", "--image", str(files / "scene0.png"), "--protected", str(out), "--mask",
                 str(files / "scene0_mask.png"), "--json", str(js), "--panel", str(files / "panel.png"),
                 "--threads", "1"]) == 0
    res = json.loads(js.read_text())
    for k in ("success_rate", "success_rate_expanded", "psnr_protected", "psnr_benign"):
        assert k in res
    assert res["psnr_protected"] > 30
    assert (files / "panel.png").is_file()
    printed = capsys.readouterr()
    assert "PSNR(protected, original)" in printed.out and "warning" not in printed.err
    # another image given as --protected (a mix-up): evaluated, with a warning that it is no protection of --image
    assert main(["eval", "protection", "--image", str(files / "scene0.png"), "--protected", str(files / "scene1.png"),
                 "--mask", str(files / "scene0_mask.png"), "--panel", str(files / "panel1.png"),
                 "--threads", "1"]) == 0
    assert "is it the protected version of" in capsys.readouterr().err


def test_protect_folder_mode(files, tmp_path):
    imgs, masks = tmp_path / "imgs", tmp_path / "masks"
    imgs.mkdir()
    masks.mkdir()
    for i in range(2):
        (imgs / f"scene{i}.png").write_bytes((files / f"scene{i}.png").read_bytes())
        (masks / f"scene{i}.png").write_bytes((files / f"scene{i}_mask.png").read_bytes())
    out = tmp_path / "out"
    assert main(["protect", str(imgs), "--mask", str(masks), "--out", str(out), "--steps", "2", "--threads", "1"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert [r["out"] for r in man["images"]] == ["scene0.png", "scene1.png"]
    assert all(r["linf"] <= 0.025 + 1e-6 for r in man["images"])


def _err(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffshield: error:") and len(err.strip().splitlines()) == 1
    return err


def test_protect_errors(files, tmp_path, capsys):
    img = str(files / "scene0.png")
    empty = tmp_path / "empty.png"
    Image.fromarray(np.zeros((64, 60), np.uint8)).save(empty)
    full = tmp_path / "full.png"
    Image.fromarray(np.full((64, 60), 255, np.uint8)).save(full)
    small = tmp_path / "small.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(small)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    out = str(tmp_path / "o.png")
    assert "empty" in _err(capsys, ["protect", img, "--mask", str(empty), "--out", out])
    assert "whole image" in _err(capsys, ["protect", img, "--mask", str(full), "--out", out])
    assert "image's size" in _err(capsys, ["protect", img, "--mask", str(small), "--out", out])
    assert "not an image" in _err(capsys, ["protect", str(text), "--mask", str(small), "--out", out])
    assert "not an image" in _err(capsys, ["protect", img, "--mask", str(text), "--out", out])
    assert ".png" in _err(capsys, ["protect", img, "--mask", str(files / "scene0_mask.png"), "--out",
                                   str(tmp_path / "o.jpg")])
    assert "does not exist" in _err(capsys, ["protect", img, "--mask", str(files / "scene0_mask.png"), "--out", out,
                                             "--inpainter", str(tmp_path / "missing.pt")])
    assert not (tmp_path / "o.png").exists()


def test_demo_step(tmp_path, capsys):
    from diffshield.cli.protect import demo_step

    summary = demo_step(tmp_path)
    json.dumps(summary)
    assert (tmp_path / "protect" / "panel.png").is_file()
    assert "[protect]" in capsys.readouterr().out


def test_a_phone_photo_is_read_the_way_viewers_show_it(files, tmp_path):
    """A JPEG whose EXIF orientation says "rotate 90°" (how phones store portrait photos) is protected upright: the
    mask drawn on the photo as viewers show it fits, and the protected PNG has the displayed orientation."""
    from diffshield.cli.protect import load_image, load_mask

    upright = Image.open(files / "scene0.png").convert("RGB")  # 60 x 64, as the user sees the photo
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # the sensor's pixels; EXIF 6 rotates them back
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "photo.jpg"
    stored.save(photo, quality=95, exif=exif)
    assert Image.open(photo).size == (64, 60)
    x = load_image(photo)
    assert tuple(x.shape[-2:]) == (64, 60)  # H x W of the upright photo
    assert np.abs(x[0].permute(1, 2, 0).numpy() * 255 - np.asarray(upright, dtype=np.float32)).mean() < 8  # JPEG
    assert tuple(load_mask(files / "scene0_mask.png", size=(64, 60)).shape[-2:]) == (64, 60)
    out = tmp_path / "prot.png"
    assert main(["protect", str(photo), "--mask", str(files / "scene0_mask.png"), "--out", str(out), "--steps",
                 "1", "--threads", "1"]) == 0
    assert Image.open(out).size == (60, 64)


def test_the_protected_png_keeps_the_originals_colour_profile(files, tmp_path):
    """A photo with an embedded colour profile (a phone's Display P3, ...) is protected into a PNG with the same
    profile, so that colour-managed viewers show it as they show the original."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = tmp_path / "profiled.png"
    Image.open(files / "scene0.png").save(src, icc_profile=icc)
    out = tmp_path / "prot.png"
    assert main(["protect", str(src), "--mask", str(files / "scene0_mask.png"), "--out", str(out), "--steps", "1",
                 "--threads", "1"]) == 0
    assert Image.open(out).info.get("icc_profile") == icc
    folder_out = tmp_path / "many"  # folder mode too
    (tmp_path / "in").mkdir()
    Image.open(src).save(tmp_path / "in" / "a.png", icc_profile=icc)
    assert main(["protect", str(tmp_path / "in"), "--mask", str(files / "scene0_mask.png"), "--out",
                 str(folder_out), "--steps", "1", "--threads", "1"]) == 0
    assert Image.open(folder_out / "a.png").info.get("icc_profile") == icc
