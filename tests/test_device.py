"""Device and dtype plumbing, checked without a GPU: resolution and refusals, bfloat16 models on the CPU (any tensor
the library made in float32 next to bfloat16 weights fails loudly), seeds that do not depend on the dtype, and ESD's
mixed-precision path."""

import pytest
import torch

from diffshield.cli.main import main
from diffshield.core.device import autocast, autocast_dtype, resolve_device, resolve_dtype, to_device
from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import load_t2i
from diffshield.core.sampling import SampleConfig, encode_prompts, generate, initial_latents

HAS_CUDA = torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_resolve_device_auto_and_cpu():
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", "cuda:-1", ""])
def test_unknown_device_strings_are_refused(bad):
    if bad == "":
        assert resolve_device(bad) == resolve_device("auto")  # empty = auto
        return
    with pytest.raises(DiffshieldError, match="unknown device"):
        resolve_device(bad)


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_absent_cuda_is_refused(spec):
    with pytest.raises(DiffshieldError, match="no CUDA GPU"):
        resolve_device(spec)


def test_resolve_dtype_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a torch.device needs no GPU to exist
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.float16  # inference on CUDA
    assert resolve_dtype("auto", cuda, training=True) == torch.float32  # master weights stay float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype(torch.float16, cuda) == torch.float16
    with pytest.raises(DiffshieldError, match="float16 on the CPU"):
        resolve_dtype("float16", cpu)
    with pytest.raises(DiffshieldError, match="unknown dtype"):
        resolve_dtype("fp8", cpu)
    with pytest.raises(DiffshieldError, match="unsupported dtype"):
        resolve_dtype(torch.int8, cpu)


def test_autocast_is_a_no_op_on_cpu_unless_asked():
    assert autocast_dtype("cpu") is None
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast("cpu"):
        assert (a @ b).dtype == torch.float32
    with autocast("cpu", dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.bfloat16
    with autocast("cpu", enabled=False, dtype=torch.bfloat16):
        assert (a @ b).dtype == torch.float32


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "toy:t2i", "--prompt", "a red box", "--n", "1", "--device", "{dev}", "--out", "{out}"],
    ["erase", "--method", "uce", "--model", "toy:t2i", "--concept", "triangle", "--device", "{dev}", "--out", "{out}"],
    ["audit", "--model", "toy:t2i", "--concept", "triangle", "--device", "{dev}"],
    ["scan", "--model", "toy:ddpm", "--device", "{dev}"],
    ["protect", "x.png", "--mask", "m.png", "--out", "{out}", "--device", "{dev}"],
])
@pytest.mark.parametrize("dev", ["tpu", "cuda:7"])
def test_cli_refuses_bad_device_in_one_line_before_loading(argv, dev, tmp_path, capsys):
    if dev == "cuda:7" and HAS_CUDA and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    out = tmp_path / "out.png"
    rc = main([a.format(dev=dev, out=out) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "device" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_refuses_float16_on_cpu(tmp_path, capsys):
    rc = main(["generate", "--model", "toy:t2i", "--prompt", "a red triangle", "--n", "1", "--device", "cpu",
               "--dtype", "float16", "--out", str(tmp_path / "o")])
    assert rc == 2 and "float16 on the CPU" in capsys.readouterr().err


def test_model_to_moves_and_casts_and_clears_the_prompt_cache(tiny_sd_dir):
    model = load_t2i(tiny_sd_dir)
    encode_prompts(model, ["a red box"])
    assert model._text_cache
    model.to(dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device == torch.device("cpu")
    assert not model._text_cache
    assert all(p.dtype == torch.bfloat16 for m in (model.unet, model.vae, model.text_encoder)
               for p in m.parameters())
    assert encode_prompts(model, ["a red box"]).dtype == torch.bfloat16


def test_seeds_give_the_same_noise_in_every_dtype(tiny_sd_dir):
    f32 = load_t2i(tiny_sd_dir)
    bf16 = load_t2i(tiny_sd_dir, dtype="bfloat16")
    a, b = initial_latents(f32, [3, 4]), initial_latents(bf16, [3, 4])
    assert a.dtype == torch.float32 and b.dtype == torch.bfloat16
    assert torch.equal(a.to(torch.bfloat16), b)


def test_toy_model_in_bfloat16_draws_what_float32_draws():
    """Every tensor the sampler creates follows the model's dtype (a float32 one next to bfloat16 weights would raise)
    and bfloat16 images match float32 ones up to rounding; images come back float32 on the CPU."""
    cfg = SampleConfig(steps=8, batch_size=4)
    prompts, seeds = ["a red triangle", "a blue circle"], [0, 1]
    ref = generate(load_t2i("toy:t2i"), prompts, seeds, config=cfg, progress=False).images
    got = generate(load_t2i("toy:t2i", dtype="bfloat16"), prompts, seeds, config=cfg, progress=False).images
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert torch.isfinite(got).all()
    assert (got - ref).abs().mean() < 0.05


def test_esd_mixed_precision_keeps_float32_master_weights(tiny_sd_dir):
    from diffshield.erase.esd import ESDConfig, esd_erase

    model = load_t2i(tiny_sd_dir)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    res = esd_erase(model, ["a red box"], ESDConfig(iterations=3, ddim_steps=4, lr=1e-3, mixed_precision="bf16"),
                    progress=False)
    assert all(p.dtype == torch.float32 for p in model.unet.parameters())
    assert res.changed and all(".attn2." in n for n in res.changed)
    moved = max(float((model.unet.get_parameter(n) - before[n]).abs().max()) for n in res.changed)
    assert 0 < moved < 1


def test_esd_rejects_unknown_mixed_precision():
    from diffshield.erase.esd import ESDConfig

    with pytest.raises(DiffshieldError, match="mixed_precision"):
        ESDConfig(mixed_precision="tf32")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA,
                                                                                          reason="needs CUDA"))])
def test_to_device_moves_cpu_draws_exactly(device):
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    y = to_device(x, device)
    assert y.device.type == device and torch.equal(y.cpu(), x)
    z = to_device(x, device, torch.bfloat16)
    assert z.dtype == torch.bfloat16 and torch.equal(z.cpu(), x.to(torch.bfloat16))


@pytest.mark.parametrize("argv", [
    ["protect", "x.png", "--mask", "m.png", "--out", "{out}"],
    ["eval", "protection", "--image", "x.png", "--protected", "y.png", "--mask", "m.png"],
    ["backdoor", "train-ddpm", "--out", "{out}"],
    ["backdoor", "implant", "--out", "{out}"],
])
def test_float32_commands_refuse_another_dtype_in_one_line(argv, tmp_path, capsys):
    """Commands whose model runs in float32 whatever is asked (DDPM training with float32 master weights, the
    inpainter) refuse --dtype bfloat16 in one line instead of ignoring it; their help says so."""
    out = tmp_path / "out.png"
    assert main([a.format(out=out) for a in argv] + ["--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err.strip()
    assert "keeps float32 weights" in err and "--dtype bfloat16" in err and "\n" not in err
    assert not out.exists()
    try:
        main([argv[0], *argv[1:2 if argv[0] != "protect" else 1], "--help"])
    except SystemExit:
        pass
    assert "this command keeps float32 weights" in " ".join(capsys.readouterr().out.split())
