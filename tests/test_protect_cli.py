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
    assert (tmp_path / "panel.png").is_file()  # the demo gives the step its own folder
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


# ----------------------------------------------------------------------------------------------- reported defects


def _copy(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst


def _png16_rgb(arr: np.ndarray, path) -> None:
    """A 16-bit RGB PNG, written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("names", [("a.png", "a.jpg"), ("x.png", "X.PNG")])
def test_folder_mode_refuses_images_that_would_write_the_same_output(files, tmp_path, capsys, names):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for n in names:
        Image.open(files / "scene0.png").save(imgs / n)
    out = tmp_path / "out"
    err = _err(capsys, ["protect", str(imgs), "--mask", str(files / "scene0_mask.png"), "--out", str(out),
                        "--steps", "1"])
    assert "would both be written" in err and not out.exists()


def test_an_eps_below_the_default_init_works_and_one_below_an_8_bit_step_is_refused(files, tmp_path, capsys):
    out = tmp_path / "p.png"
    argv = ["protect", str(files / "scene0.png"), "--mask", str(files / "scene0_mask.png"), "--steps", "2",
            "--threads", "1"]
    assert main([*argv, "--out", str(out), "--eps", "0.005"]) == 0, capsys.readouterr().err
    a = np.asarray(Image.open(files / "scene0.png"), dtype=np.int16)
    assert np.abs(np.asarray(Image.open(out), dtype=np.int16) - a).max() <= 1  # 0.005 * 255 = 1.3
    capsys.readouterr()
    assert "8-bit step" in _err(capsys, [*argv, "--out", str(tmp_path / "q.png"), "--eps", "0.003"])


def test_16_bit_colour_is_refused_and_16_bit_masks_are_cut_at_half(files, tmp_path, capsys):
    from diffshield.cli.protect import load_mask

    rgb16 = (np.asarray(Image.open(files / "scene0.png")).astype(np.uint32) * 257 + 200).astype(np.uint16)
    _png16_rgb(rgb16, tmp_path / "rgb16.png")
    out = tmp_path / "p.png"
    err = _err(capsys, ["protect", str(tmp_path / "rgb16.png"), "--mask", str(files / "scene0_mask.png"), "--out",
                        str(out)])
    assert "16-bit colour" in err and not out.exists()
    m16 = np.zeros((32, 32), np.uint16)
    m16[:, 8:16] = 1000  # 1.5 % of full scale: not the region
    m16[:, 16:24] = 30000  # 46 %: not the region
    m16[:, 24:] = 40000  # 61 %: the region
    Image.fromarray(m16).save(tmp_path / "m16.png")
    assert Image.open(tmp_path / "m16.png").mode.startswith("I")
    m = load_mask(tmp_path / "m16.png")[0, 0].numpy()
    assert m[:, :24].sum() == 0 and m[:, 24:].min() == 1


def test_a_greyscale_profile_is_not_put_on_the_rgb_output(files, tmp_path):
    gray_icc = bytearray(128)
    gray_icc[12:20] = b"mntrGRAY"  # the header's device class and data colour space: a greyscale profile
    src = tmp_path / "grey.png"
    Image.open(files / "scene0.png").convert("L").save(src, icc_profile=bytes(gray_icc))
    assert Image.open(src).info["icc_profile"][16:20] == b"GRAY"
    out = tmp_path / "p.png"
    assert main(["protect", str(src), "--mask", str(files / "scene0_mask.png"), "--out", str(out), "--steps", "1",
                 "--threads", "1"]) == 0
    with Image.open(out) as im:
        assert im.mode == "RGB" and "icc_profile" not in im.info


def test_folder_mode_finds_a_mask_with_an_upper_case_suffix(files, tmp_path):
    _copy(files / "scene0.png", tmp_path / "imgs" / "C.png")
    _copy(files / "scene0_mask.png", tmp_path / "masks" / "C.PNG")
    assert main(["protect", str(tmp_path / "imgs"), "--mask", str(tmp_path / "masks"), "--out",
                 str(tmp_path / "out"), "--steps", "1", "--threads", "1"]) == 0
    assert (tmp_path / "out" / "C.png").is_file()


def test_a_transparency_colour_key_is_refused(files, tmp_path):
    from diffshield.cli.protect import load_image
    from diffshield.core.errors import DiffshieldError

    rgb = np.asarray(Image.open(files / "scene0.png").convert("RGB"))
    Image.fromarray(rgb).save(tmp_path / "rgb.png", transparency=tuple(int(v) for v in rgb[0, 0]))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "l.png", transparency=int(rgb[0, 0, 0]))
    for name in ("rgb.png", "l.png"):
        assert "transparency" in Image.open(tmp_path / name).info
        with pytest.raises(DiffshieldError, match="transparent"):
            load_image(tmp_path / name)
    unused = tmp_path / "unused.png"  # a key that no pixel has: nothing is transparent
    Image.fromarray(np.full((20, 20, 3), 9, np.uint8)).save(unused, transparency=(1, 2, 3))
    assert load_image(unused).shape == (1, 3, 20, 20)


def test_a_decompression_bomb_mask_is_one_line(files, monkeypatch):
    from diffshield.cli.protect import load_mask
    from diffshield.core.errors import DiffshieldError

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 64 x 60 mask is then over twice the limit
    with pytest.raises(DiffshieldError, match="not an image Pillow can read"):
        load_mask(files / "scene0_mask.png")


def test_silently_accepted_inputs_are_refused_or_handled(files, tmp_path, capsys):
    img, mask = files / "scene0.png", files / "scene0_mask.png"
    imgs = tmp_path / "imgs"
    _copy(img, imgs / "a.png")
    out = tmp_path / "out"
    # the image folder given as its own mask folder
    assert "image folder itself" in _err(capsys, ["protect", str(imgs), "--mask", str(imgs), "--out", str(out)])
    # --eot-samples without --robust would be ignored
    assert "--robust" in _err(capsys, ["protect", str(img), "--mask", str(mask), "--out", str(tmp_path / "p.png"),
                                       "--eot-samples", "3"])
    # a multi-page TIFF: only its first page would be protected
    pages = [Image.open(img).convert("RGB"), Image.open(img).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    pages[0].save(tmp_path / "multi.tif", save_all=True, append_images=pages[1:])
    assert "2 pages" in _err(capsys, ["protect", str(tmp_path / "multi.tif"), "--mask", str(mask), "--out",
                                      str(tmp_path / "p.png")])
    pages[0].save(tmp_path / "phone.jpg", format="MPO", save_all=True, append_images=pages[1:])  # a camera JPEG
    from diffshield.cli.protect import load_image

    assert Image.open(tmp_path / "phone.jpg").n_frames == 2 and load_image(tmp_path / "phone.jpg").shape[-1] == 60
    # a mask with transparent pixels: what its colour means is unclear
    rgba = np.dstack([np.asarray(Image.open(mask).convert("RGB")), np.full((64, 60), 255, np.uint8)])
    rgba[:4, :4, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "mask_rgba.png")
    assert "transparent" in _err(capsys, ["protect", str(img), "--mask", str(tmp_path / "mask_rgba.png"), "--out",
                                          str(tmp_path / "p.png")])
    assert not out.exists() and not (tmp_path / "p.png").exists()
    # a shared mask kept inside the image folder is the mask, not an image to protect
    _copy(mask, imgs / "mask.png")
    assert main(["protect", str(imgs), "--mask", str(imgs / "mask.png"), "--out", str(out), "--steps", "1",
                 "--threads", "1"]) == 0
    assert [r["image"] for r in json.loads((out / "manifest.json").read_text())["images"]] == ["a.png"]
    assert not (out / "mask.png").exists()
