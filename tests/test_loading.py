import json
import shutil

import pytest
import torch

from diffshield.cli.main import main
from diffshield.core.errors import DiffshieldError
from diffshield.core.loading import load_t2i


def test_loads_tiny_folder(tiny_model):
    assert tiny_model.image_size == 16
    assert tiny_model.latent_shape == (4, 8, 8)
    assert not any(p.requires_grad for p in tiny_model.unet.parameters())


def test_missing_path(tmp_path):
    with pytest.raises(DiffshieldError, match="does not exist"):
        load_t2i(tmp_path / "nope")


def test_unknown_toy_name():
    with pytest.raises(DiffshieldError, match="unknown toy model"):
        load_t2i("toy:nope")


def test_not_a_diffusers_folder(tmp_path):
    with pytest.raises(DiffshieldError, match="no model_index.json"):
        load_t2i(tmp_path)


def test_single_file_refused(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(DiffshieldError, match="single file"):
        load_t2i(f)


def test_ddpm_folder_is_the_wrong_kind(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(4, 8), norm_num_groups=2, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(DiffshieldError, match="DDPMPipeline.*not a text-to-image model"):
        load_t2i(tmp_path / "ddpm")


def test_text_encoder_weights_that_do_not_load_are_refused(tiny_sd_copy):
    """transformers only logs the weights of a text encoder it could not match (another version's key names), and
    the encoder then stays random: every image would be silently wrong. load_t2i refuses it in one line."""
    from safetensors.torch import load_file, save_file

    f = tiny_sd_copy / "text_encoder" / "model.safetensors"
    tensors = load_file(str(f))
    dropped = sorted(k for k in tensors if "final_layer_norm" in k)
    assert dropped
    save_file({k: v for k, v in tensors.items() if k not in dropped}, str(f))
    with pytest.raises(DiffshieldError, match=r"lacks 2 of its weights.*stay random") as e:
        load_t2i(tiny_sd_copy)
    assert "\n" not in str(e.value)
    save_file({f"old_name.{k}": v for k, v in tensors.items()}, str(f))  # every key under another name
    with pytest.raises(DiffshieldError, match="stay random"):
        load_t2i(tiny_sd_copy)


def _pickle_unet(folder):
    from safetensors.torch import load_file

    st = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(st)), folder / "unet" / "diffusion_pytorch_model.bin")
    st.unlink()


def test_pickled_weights_refused_unless_allowed(tiny_sd_copy, tiny_model):
    _pickle_unet(tiny_sd_copy)
    with pytest.raises(DiffshieldError, match="refusing pickled weights.*--allow-pickle"):
        load_t2i(tiny_sd_copy)
    m = load_t2i(tiny_sd_copy, allow_pickle=True)
    w = dict(m.unet.named_parameters())["conv_in.weight"]
    assert torch.equal(w, dict(tiny_model.unet.named_parameters())["conv_in.weight"])


def test_truncated_weights(tiny_sd_copy):
    st = tiny_sd_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(DiffshieldError, match="truncated or corrupt"):
        load_t2i(tiny_sd_copy)


def test_corrupt_header(tiny_sd_copy):
    st = tiny_sd_copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(st.read_bytes())
    data[8:20] = b"not json!!!!"
    st.write_bytes(bytes(data))
    with pytest.raises(DiffshieldError, match="corrupt"):
        load_t2i(tiny_sd_copy)


def test_missing_component_folder(tiny_sd_copy):
    shutil.rmtree(tiny_sd_copy / "text_encoder")
    with pytest.raises(DiffshieldError, match="no 'text_encoder/' folder"):
        load_t2i(tiny_sd_copy)


@pytest.mark.parametrize("case", ["missing", "pickle", "truncated", "ddpm-like"])
def test_cli_errors_are_one_line(case, tiny_sd_copy, tmp_path, capsys):
    path = tiny_sd_copy
    if case == "missing":
        path = tmp_path / "missing"
    elif case == "pickle":
        _pickle_unet(tiny_sd_copy)
    elif case == "truncated":
        st = tiny_sd_copy / "unet" / "diffusion_pytorch_model.safetensors"
        st.write_bytes(st.read_bytes()[:100])
    else:
        shutil.rmtree(tiny_sd_copy / "unet")
        (tiny_sd_copy / "model_index.json").write_text('{"_class_name": "DDPMPipeline", "unet": null}')
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(path), "--prompt", "a red box", "--n", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("diffshield: error: ") and "\n" not in err and "Traceback" not in err
    assert not out.exists()


def _as_variant(folder, variant: str = "fp16") -> None:
    """Rename every plain weight file as ``save_pretrained(variant=...)`` names it (an fp16-only download)."""
    for f in list(folder.glob("*/*.safetensors")):
        f.rename(f.with_name(f"{f.stem}.{variant}{f.suffix}"))


def test_a_folder_of_one_weight_variant_loads_and_draws_what_the_plain_one_draws(tiny_sd_copy, tiny_model):
    from diffshield.core.sampling import SampleConfig, generate

    _as_variant(tiny_sd_copy)
    model = load_t2i(tiny_sd_copy)
    cfg = SampleConfig(steps=2)
    a = generate(tiny_model, ["a red triangle"], [0], config=cfg, progress=False).images
    b = generate(model, ["a red triangle"], [0], config=cfg, progress=False).images
    # equal up to float rounding: the session's tiny_model may hold this prompt's embedding from an earlier, larger
    # encoder batch (another test's), and a CPU matmul's last bits depend on the batch's size
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # two variants and no plain file: which to load is the user's choice, refused in one line
    unet = tiny_sd_copy / "unet"
    shutil.copy(unet / "diffusion_pytorch_model.fp16.safetensors", unet / "diffusion_pytorch_model.ema.safetensors")
    with pytest.raises(DiffshieldError, match="several variants \\(ema, fp16\\)"):
        load_t2i(tiny_sd_copy)
    # a plain file next to variants is the one loaded
    shutil.copy(unet / "diffusion_pytorch_model.fp16.safetensors", unet / "diffusion_pytorch_model.safetensors")
    assert torch.equal(generate(load_t2i(tiny_sd_copy), ["a red triangle"], [0], config=cfg, progress=False).images, b)


def test_a_ddpm_folder_of_one_weight_variant_loads(tmp_path):
    from diffshield.backdoor.ddpm import load_ddpm, resolve_ddpm_path

    src, dst = resolve_ddpm_path("toy:ddpm"), tmp_path / "ddpm"
    dst.mkdir()
    shutil.copy(src / "model_index.json", dst)
    for comp in ("unet", "scheduler"):
        shutil.copytree(src / comp, dst / comp)
    _as_variant(dst)
    assert not list(dst.glob("unet/diffusion_pytorch_model.safetensors"))
    a, b = load_ddpm("toy:ddpm").unet.state_dict(), load_ddpm(dst).unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save_with_safety_checker(tiny_sd_dir, dst, **save_kw):
    """The tiny pipeline saved with a tiny safety checker and feature extractor, as Stable Diffusion's folders are;
    returns the checker."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    tiny = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    checker = StableDiffusionSafetyChecker(CLIPConfig(
        text_config=dict(tiny, vocab_size=100, max_position_embeddings=16),
        vision_config=dict(tiny, image_size=32, patch_size=16), projection_dim=8))
    StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
        scheduler=pipe.scheduler, safety_checker=checker, requires_safety_checker=True,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
    ).save_pretrained(dst, safe_serialization=True, **save_kw)
    return checker


def test_a_saved_model_keeps_the_components_diffshield_does_not_load(tiny_sd_dir, tmp_path):
    """Stable Diffusion folders carry a safety checker and its feature extractor, which diffshield does not load;
    an edited model written by diffshield keeps them (copied as they are), so erasing a concept never drops them."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from safetensors.torch import load_file

    from diffshield.erase.uce import UCEConfig, uce_erase

    src = tmp_path / "sd"
    checker = _save_with_safety_checker(tiny_sd_dir, src)

    model = load_t2i(src)
    uce_erase(model, ["red square"], UCEConfig())
    model.save(tmp_path / "erased")
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "erased")
    assert isinstance(again.safety_checker, StableDiffusionSafetyChecker) and again.feature_extractor is not None
    assert again.config.requires_safety_checker is True
    weights = sorted((src / "safety_checker").glob("*.safetensors"))
    assert weights and all(load_file(str(f)).keys() == load_file(str(tmp_path / "erased" / "safety_checker" /
                                                                      f.name)).keys() for f in weights)
    for name, p in checker.named_parameters():
        assert torch.equal(dict(again.safety_checker.named_parameters())[name], p), name
    # the toy model has none, and its saved copy has none either
    toy = load_t2i("toy:t2i")
    toy.save(tmp_path / "toy")
    assert not (tmp_path / "toy" / "safety_checker").exists()


def _header_dtypes(folder) -> set[str]:
    from diffshield.core.loading import check_safetensors

    return {v["dtype"] for f in folder.glob("*/*.safetensors") for k, v in check_safetensors(f).items()
            if k != "__metadata__"}


def test_a_model_is_saved_in_the_dtype_of_its_files_whatever_it_was_loaded_in(tiny_sd_dir, tmp_path):
    """An fp16 checkpoint edited in float32 is saved in fp16, its unedited weights bit for bit; a float32 model
    loaded in bfloat16 is saved in float32 (with a warning that it keeps the load's rounding), so stock diffusers
    runs it without a torch_dtype: a bfloat16 text encoder beside the float32 UNet diffusers loads could not run."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from diffshield.erase.uce import UCEConfig, uce_erase

    src = tmp_path / "fp16"
    StableDiffusionPipeline.from_pretrained(tiny_sd_dir).to(torch.float16).save_pretrained(
        src, variant="fp16", safe_serialization=True)
    model = load_t2i(src)  # float32 in memory
    assert model.dtype == torch.float32 and set(model.stored_dtypes.values()) == {torch.float16}
    res = uce_erase(model, ["red square"], UCEConfig())
    model.save(tmp_path / "erased16")
    assert model.dtype == torch.float32  # the model in memory is left as it was
    assert _header_dtypes(tmp_path / "erased16") == {"F16"}
    before = load_file(src / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    after = load_file(tmp_path / "erased16" / "unet" / "diffusion_pytorch_model.safetensors")
    edited = {n.removeprefix("unet.") for n in res.changed}
    assert edited and all(torch.equal(after[k], before[k]) for k in before if k not in edited)
    assert all(torch.equal(after[k], model.unet.state_dict()[k].half()) for k in edited)
    assert not all(torch.equal(after[k], before[k]) for k in edited)

    plain = load_t2i(tiny_sd_dir, dtype="bfloat16")
    with pytest.warns(UserWarning, match="keeps the rounding of a load in a narrower dtype"):
        plain.save(tmp_path / "from_bf16")
    assert _header_dtypes(tmp_path / "from_bf16") == {"F32"}
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "from_bf16", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(["a red square"], num_inference_steps=1, output_type="np").images.shape[0] == 1


def test_an_edit_that_overflows_an_fp16_checkpoint_is_refused_before_anything_is_written(tiny_sd_dir, tmp_path):
    """Edited in float32, a weight beyond float16's 65504 would be saved as inf in the fp16 checkpoint (the check of
    the float32 model passed): it is refused in one line naming the dtype and the weight, and no folder is made."""
    from diffusers import StableDiffusionPipeline

    src = tmp_path / "fp16"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir).to(torch.float16)
    pipe.save_pretrained(src, safe_serialization=True)
    model = load_t2i(src)
    with torch.no_grad():
        model.unet.conv_in.weight[0, 0, 0, 0] = 1e5
    with pytest.raises(DiffshieldError) as e:
        model.save(tmp_path / "out")
    msg = str(e.value)
    assert "float16" in msg and "unet.conv_in.weight" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_an_fp16_only_download_saves_a_folder_stock_diffusers_loads(tiny_sd_dir, tmp_path):
    """Every file of an fp16-only download carries the variant, the safety checker's (and its shards') too; the
    saved networks have plain names, so the copied safety checker gets them as well (stock ``from_pretrained``
    found no weights in it), with its values unchanged."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    src, out = tmp_path / "fp16", tmp_path / "erased"
    fp16 = tmp_path / "fp32"
    _save_with_safety_checker(tiny_sd_dir, fp16)
    StableDiffusionPipeline.from_pretrained(fp16).to(torch.float16).save_pretrained(
        src, variant="fp16", safe_serialization=True, max_shard_size="5KB")
    shards = sorted(p.name for p in (src / "safety_checker").iterdir())
    assert "model.safetensors.index.fp16.json" in shards and not (src / "safety_checker/model.safetensors").exists()
    load_t2i(src).save(out)
    names = sorted(p.name for p in (out / "safety_checker").iterdir())
    assert names == sorted(n.replace(".fp16.", ".") for n in shards)
    index = json.loads((out / "safety_checker" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) <= set(names)
    before = {k: v for f in (src / "safety_checker").glob("*.safetensors") for k, v in load_file(f).items()}
    after = {k: v for f in (out / "safety_checker").glob("*.safetensors") for k, v in load_file(f).items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    pipe = StableDiffusionPipeline.from_pretrained(out).to(torch.float16)
    assert pipe.safety_checker is not None
