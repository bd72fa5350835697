"""The backdoor commands on diffusers folders laid out as published DDPM checkpoints are (google/ddpm-cifar10-32:
attention blocks, ``clip_sample`` on; DDIM folders; learned-variance ports; greyscale; pickled weights; other
pipeline classes): what is supported works as the stock pipeline does, the rest is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffshield.backdoor.ddpm import load_ddpm
from diffshield.cli.main import main
from diffshield.core.errors import DiffshieldError


def tiny_unet(size: int = 8, channels: int = 3, out_channels: int | None = None, attention: bool = True):
    """A UNet2DModel with the block layout of google/ddpm-cifar10-32 (an attention level), a few thousand weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    down = ("DownBlock2D", "AttnDownBlock2D") if attention else ("DownBlock2D", "DownBlock2D")
    up = ("AttnUpBlock2D", "UpBlock2D") if attention else ("UpBlock2D", "UpBlock2D")
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=out_channels or channels,
                       block_out_channels=(4, 8), layers_per_block=1, down_block_types=down, up_block_types=up,
                       norm_num_groups=2, attention_head_dim=4)


def cifar_scheduler(**over):
    """google/ddpm-cifar10-32's scheduler: 1000 linear betas 1e-4 .. 0.02, clip_sample on, fixed_small."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                            "beta_schedule": "linear", "clip_sample": True, "variance_type": "fixed_small", **over})


def ddpm_folder(path: Path, unet=None, scheduler=None, **save_kw) -> Path:
    from diffusers import DDPMPipeline

    DDPMPipeline(unet=unet or tiny_unet(), scheduler=scheduler or cifar_scheduler()).save_pretrained(path, **save_kw)
    return path


def one_line_refusal(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI, expect exit status 2 with a one-line error holding every needle."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_other_pipeline_classes_are_refused(tmp_path, capsys):
    """A latent LDMPipeline (a VQ-VAE decodes its UNet's output) and a score-SDE ScoreSdeVePipeline (no DDPM
    betas) are no pixel-space DDPMs: every command refuses them in one line instead of sampling them as one."""
    from diffusers import DDIMScheduler, LDMPipeline, ScoreSdeVePipeline, ScoreSdeVeScheduler, VQModel

    torch.manual_seed(0)
    vq = VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=(4,), norm_num_groups=2,
                 num_vq_embeddings=8, vq_embed_dim=3)
    LDMPipeline(vqvae=vq, unet=tiny_unet(), scheduler=DDIMScheduler()).save_pretrained(tmp_path / "ldm")
    ScoreSdeVePipeline(unet=tiny_unet(), scheduler=ScoreSdeVeScheduler(num_train_timesteps=1000)).save_pretrained(
        tmp_path / "sde")
    for name, kind in (("ldm", "LDMPipeline"), ("sde", "ScoreSdeVePipeline")):
        folder = str(tmp_path / name)
        with pytest.raises(DiffshieldError, match=f"holds a {kind}.*DDPMPipeline or DDIMPipeline"):
            load_ddpm(folder)
        for argv in (["backdoor", "sample", "--model", folder, "--n", "1", "--steps", "1", "--out",
                      str(tmp_path / f"s_{name}")],
                     ["backdoor", "implant", "--model", folder, "--out", str(tmp_path / f"bd_{name}")]):
            one_line_refusal(capsys, argv, kind)
        assert not (tmp_path / f"s_{name}").exists() and not (tmp_path / f"bd_{name}").exists()


def test_learned_variance_unet_is_not_read_as_epsilon(tmp_path, capsys):
    """An improved-DDPM / ADM-style port (out_channels 6 = eps and variance, variance_type learned_range) is refused
    by every command before any work: its variance channels would be read as eps or break the loss."""
    folder = ddpm_folder(tmp_path / "learned", tiny_unet(out_channels=6),
                         cifar_scheduler(variance_type="learned_range"))
    with pytest.raises(DiffshieldError, match="learned-variance UNet"):
        load_ddpm(folder)
    noise = tmp_path / "noise.safetensors"
    from safetensors.torch import save_file

    save_file({"noise": torch.randn(2, 3, 8, 8)}, str(noise))
    for argv in (["backdoor", "sample", "--model", str(folder), "--n", "1", "--steps", "2", "--out",
                  str(tmp_path / "s")],
                 ["backdoor", "sample", "--model", str(folder), "--n", "1", "--steps", "2", "--scheduler", "ddim",
                  "--out", str(tmp_path / "s")],
                 ["scan", "--model", str(folder), "--preset", "fast"],
                 ["scan-input", "--model", str(folder), "--preset", "fast", "--noise", str(noise)],
                 ["backdoor", "implant", "--model", str(folder), "--out", str(tmp_path / "bd")]):
        one_line_refusal(capsys, argv, "learned-variance", "out_channels 6")
    assert not (tmp_path / "s").exists() and not (tmp_path / "bd").exists()


def test_sampler_honours_clip_sample_and_matches_the_stock_pipelines(tmp_path, capsys):
    """On a folder with clip_sample on (as google/ddpm-cifar10-32) and on a DDIMPipeline folder (set_alpha_to_one
    on), sample() draws exactly what stock DDPMPipeline / DDIMPipeline draw for the same per-image generators;
    --clip off is the explicit, recorded way to sample without clipping."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    from diffshield.backdoor.sampling import SampleConfig, sample

    seeds = [0, 1]
    cifar = ddpm_folder(tmp_path / "cifar")
    ours = sample(load_ddpm(cifar), seeds, config=SampleConfig("ddpm", 10)).images
    stock = DDPMPipeline.from_pretrained(cifar)(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in
                                                                         seeds], num_inference_steps=10,
                                                 output_type="np").images
    assert float((ours.permute(0, 2, 3, 1) - torch.from_numpy(stock)).abs().max()) < 1e-5
    unclipped = sample(load_ddpm(cifar), seeds, config=SampleConfig("ddpm", 10, clip=False)).images
    assert float((unclipped - ours).abs().max()) > 0.01  # the random tiny UNet's x0 leaves [-1, 1]

    ddim = tmp_path / "ddim"
    DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(clip_sample=True)).save_pretrained(ddim)
    ours = sample(load_ddpm(ddim), seeds, config=SampleConfig("ddim", 10)).images
    stock = DDIMPipeline.from_pretrained(ddim)(batch_size=2, generator=[torch.Generator().manual_seed(s) for s in
                                                                        seeds], num_inference_steps=10, eta=0.0,
                                               output_type="np").images
    assert float((ours.permute(0, 2, 3, 1) - torch.from_numpy(stock)).abs().max()) < 1e-5

    for clip, want in (("model", True), ("off", False)):
        out = tmp_path / f"s_{clip}"
        assert main(["backdoor", "sample", "--model", str(cifar), "--n", "1", "--steps", "2", "--clip", clip,
                     "--out", str(out)]) == 0
        assert json.loads((out / "manifest.json").read_text())["sampling"]["clip"] is want
        assert ("clip_sample on" in capsys.readouterr().out) is (clip == "model")


def test_implant_honours_allow_pickle(tmp_path, capsys):
    """A folder with pickled .bin weights only (as older hub checkpoints) implants with --allow-pickle, as the other
    commands load it; without the flag it is refused in one line."""
    folder = ddpm_folder(tmp_path / "bin", tiny_unet(32), safe_serialization=False)
    assert not list((folder / "unet").glob("*.safetensors"))
    tiny = ["--epochs", "1", "--pool-size", "8", "--batch-size", "8", "--poison-rate", "0.5"]
    one_line_refusal(capsys, ["backdoor", "implant", "--model", str(folder), *tiny, "--out", str(tmp_path / "no")],
                     "--allow-pickle")
    assert main(["backdoor", "implant", "--model", str(folder), "--allow-pickle", *tiny, "--out",
                 str(tmp_path / "bd")]) == 0
    assert load_ddpm(tmp_path / "bd").scheduler.config.clip_sample is True  # the folder's scheduler is kept


def test_greyscale_model_gets_greyscale_triggers_and_targets(tmp_path, capsys):
    """A 1-channel (MNIST-like) model samples and evaluates with the built-in triggers and targets as their
    luminance (the -1 background stays -1); clean quality (the toy world's RGB detector) is refused in one line."""
    from diffshield.backdoor.triggers import get_target, get_trigger

    g = get_trigger("stop", 8, channels=1)
    rgb = get_trigger("stop", 8)
    assert g.shape == (1, 8, 8) and float(g.min()) == -1.0
    torch.testing.assert_close(g[0], 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])
    assert get_target("corner", 8, channels=1).shape == (1, 8, 8)
    with pytest.raises(DiffshieldError, match="4 channels"):
        get_trigger("box", 8, channels=4)

    folder = str(ddpm_folder(tmp_path / "grey", tiny_unet(8, channels=1)))
    assert main(["backdoor", "sample", "--model", folder, "--trigger", "box", "--n", "1", "--steps", "2",
                 "--out", str(tmp_path / "s")]) == 0
    assert main(["backdoor", "eval", "--model", folder, "--trigger", "box", "--target", "hat", "--n", "1",
                 "--n-clean", "0", "--steps", "2", "--json", str(tmp_path / "e.json")]) == 0
    assert 0 <= json.loads((tmp_path / "e.json").read_text())["mse"] <= 1
    one_line_refusal(capsys, ["backdoor", "eval", "--model", folder, "--trigger", "box", "--target", "hat", "--n",
                              "1", "--n-clean", "2", "--steps", "2", "--json", str(tmp_path / "e2.json")],
                     "--n-clean 0", "1-channel")
    assert not (tmp_path / "e2.json").exists()


def test_trigger_files_and_masks_are_checked(tmp_path, capsys):
    """A non-square trigger or target file is refused rather than stretched; a mask of another size than its
    trigger file, and a mask that marks no pixel (the trigger would be the -1 background alone), are refused."""
    import numpy as np
    from PIL import Image

    from diffshield.backdoor.triggers import get_target, get_trigger

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((10, 8, 3)) * 255).astype(np.uint8)).save(tmp_path / "tall.png")
    Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).save(tmp_path / "t.png")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "small_mask.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "black_mask.png")
    with pytest.raises(DiffshieldError, match="8 x 10 px.*square"):
        get_trigger(tmp_path / "tall.png", 8)
    with pytest.raises(DiffshieldError, match="8 x 10 px.*square"):
        get_target(tmp_path / "tall.png", 8)
    with pytest.raises(DiffshieldError, match="4 x 4 px but its trigger file is 8 x 8 px"):
        get_trigger(tmp_path / "t.png", 8, tmp_path / "small_mask.png")
    folder = str(ddpm_folder(tmp_path / "m"))
    one_line_refusal(capsys, ["backdoor", "sample", "--model", folder, "--trigger", str(tmp_path / "t.png"),
                              "--trigger-mask", str(tmp_path / "black_mask.png"), "--n", "1", "--steps", "1",
                              "--out", str(tmp_path / "s")], "marks no pixel")
    assert not (tmp_path / "s").exists()


def test_non_square_model_with_a_trigger_is_refused_clearly(tmp_path, capsys):
    """Built-in and file triggers are square: a (height, width) model given one is refused in one line that says so
    and what to do, not with a shape mismatch."""
    folder = str(ddpm_folder(tmp_path / "rect", tiny_unet((8, 12), attention=False)))
    one_line_refusal(capsys, ["backdoor", "sample", "--model", folder, "--trigger", "box", "--n", "1", "--steps",
                              "1", "--out", str(tmp_path / "s")], "8 x 12 px", "square", "x_T")
    one_line_refusal(capsys, ["backdoor", "eval", "--model", folder, "--trigger", "box", "--target", "corner",
                              "--n", "1", "--n-clean", "0", "--steps", "1"], "square")


def test_scan_input_checks_the_noises_against_the_named_model(tmp_path, capsys):
    """With --reversed and --model, noises of another image size than the model's are refused, even when the
    fingerprint (weights and schedule, not the sample size) matches: the same weights saved for 16 px."""
    from safetensors.torch import save_file

    from diffshield.backdoor import terd

    small, big = ddpm_folder(tmp_path / "p8"), ddpm_folder(tmp_path / "p16", tiny_unet(16))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(terd.PRESETS, "fast", {"stage1_iters": 2, "stage2_iters": 0, "batch_size": 2})
        assert main(["scan", "--model", str(small), "--preset", "fast", "--out", str(tmp_path / "scan"),
                     "--evidence-n", "0"]) == 0
    save_file({"noise": torch.randn(2, 3, 8, 8)}, str(tmp_path / "n8.safetensors"))
    one_line_refusal(capsys, ["scan-input", "--reversed", str(tmp_path / "scan"), "--model", str(big), "--noise",
                              str(tmp_path / "n8.safetensors")], "(3, 16, 16)")
    assert main(["scan-input", "--reversed", str(tmp_path / "scan"), "--model", str(small), "--noise",
                 str(tmp_path / "n8.safetensors")]) == 0


def unet_file_tensors(folder: Path) -> tuple[dict, set[str]]:
    """The UNet weights of a saved folder (one safetensors file) and the dtype names its header gives."""
    from safetensors.torch import load_file

    from diffshield.core.loading import check_safetensors

    (f,) = sorted((folder / "unet").glob("*.safetensors"))
    header = check_safetensors(f)
    return load_file(str(f)), {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_half_precision_folders_are_saved_in_their_dtype(tmp_path):
    """An fp16 (plain or ``variant="fp16"`` file names) or bfloat16 DDPM is loaded in float32 to train, and saved
    back in the dtype of its files, not twice its size in float32: stock DDPMPipeline loads the saved folder, with
    the source's weights."""
    from diffusers import DDPMPipeline

    for name, dtype, code, kw in (("fp16", torch.float16, "F16", {}),
                                  ("fp16v", torch.float16, "F16", {"variant": "fp16"}),
                                  ("bf16", torch.bfloat16, "BF16", {})):
        src = ddpm_folder(tmp_path / name, tiny_unet().to(dtype), **kw)
        model = load_ddpm(src)
        assert model.unet.dtype == torch.float32 and model.stored_dtype == dtype
        out = model.save(tmp_path / f"{name}_out")
        want, _ = unet_file_tensors(src)
        got, codes = unet_file_tensors(out)
        assert codes == {code}, (name, codes)
        assert model.unet.dtype == torch.float32  # the live model is left as it was
        stock = DDPMPipeline.from_pretrained(out).unet.state_dict()
        assert set(stock) == set(want)
        for k, v in want.items():
            assert torch.equal(got[k], v) and torch.equal(stock[k].to(dtype), v), (name, k)


def test_implant_of_an_fp16_folder_writes_an_fp16_folder(tmp_path):
    """``backdoor implant`` trains in float32 and writes the backdoored UNet in the dtype of its base's files: an fp16
    base gives an fp16 model (it wrote float32, twice the size), which stock diffusers loads and which differs from
    the base (the implant is in it, not rounded away)."""
    from diffusers import DDPMPipeline

    src = ddpm_folder(tmp_path / "fp16", tiny_unet(32).to(torch.float16))
    tiny = ["--epochs", "1", "--pool-size", "8", "--batch-size", "8", "--poison-rate", "0.5"]
    assert main(["backdoor", "implant", "--model", str(src), *tiny, "--out", str(tmp_path / "bd")]) == 0
    base, _ = unet_file_tensors(src)
    got, codes = unet_file_tensors(tmp_path / "bd")
    assert codes == {"F16"}
    stock = DDPMPipeline.from_pretrained(tmp_path / "bd").unet.to(torch.float16).state_dict()  # exact: fp16 values
    assert all(torch.equal(stock[k], v) for k, v in got.items())
    assert any(not torch.equal(got[k], v) for k, v in base.items())


def test_float32_folder_stays_float32_and_narrower_load_warns(tmp_path):
    """A float32 folder is saved as float32 with the very same values; loaded in bfloat16, it is still saved as
    float32 files, with a warning that the load's rounding is kept. A model made here has no record of files."""
    from diffshield.backdoor.ddpm import DDPMModel

    src = ddpm_folder(tmp_path / "f32")
    model = load_ddpm(src)
    assert model.stored_dtype == torch.float32
    want, _ = unet_file_tensors(src)
    got, codes = unet_file_tensors(model.save(tmp_path / "out"))
    assert codes == {"F32"} and set(got) == set(want)
    assert all(torch.equal(got[k], v) for k, v in want.items())

    narrow = load_ddpm(src, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match=r"rounding.*float32 files, loaded in bfloat16"):
        got, codes = unet_file_tensors(narrow.save(tmp_path / "bf"))
    assert codes == {"F32"} and narrow.unet.dtype == torch.bfloat16
    assert all(torch.equal(got[k], v.to(torch.bfloat16).float()) for k, v in want.items())

    fresh = DDPMModel(tiny_unet(), cifar_scheduler())
    assert fresh.stored_dtype is None
    assert unet_file_tensors(fresh.save(tmp_path / "fresh"))[1] == {"F32"}


def test_weight_beyond_float16_is_refused_before_writing(tmp_path):
    """A float32 weight that float16 cannot hold (inf once cast) in a model from fp16 files is refused in one line,
    naming the dtype, before anything is written."""
    model = load_ddpm(ddpm_folder(tmp_path / "fp16", tiny_unet().half()))
    with torch.no_grad():
        model.unet.conv_in.weight[0, 0, 0, 0] = 1e5
    out = tmp_path / "out"
    with pytest.raises(DiffshieldError, match=r"float16.*inf or NaN \(unet\.conv_in\.weight\)") as e:
        model.save(out)
    assert "\n" not in str(e.value)
    assert not out.exists()
