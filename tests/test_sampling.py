import copy

import pytest
import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.sampling import (
    SampleConfig,
    encode_prompts,
    generate,
    generate_differentiable,
    initial_latents,
)

CFG = SampleConfig(steps=3, guidance=5.0, batch_size=2)


def test_same_seed_same_image_regardless_of_batch(tiny_model):
    a = generate(tiny_model, ["a red box"] * 3, seeds=[5, 6, 7], config=CFG, progress=False)
    b = generate(tiny_model, ["a red box"], seeds=[7], config=SampleConfig(steps=3, batch_size=8), progress=False)
    assert a.images.shape == (3, 3, 16, 16)
    assert torch.allclose(a.images[2], b.images[0], atol=1e-5)
    assert not torch.allclose(a.images[0], a.images[1])
    assert a.seeds == [5, 6, 7] and a.manifest()[2] == {"index": 2, "prompt": "a red box", "seed": 7}


def test_one_prompt_as_a_string_is_one_prompt(tiny_model):
    one = generate(tiny_model, "a red box", seeds=[3], config=CFG, progress=False)
    listed = generate(tiny_model, ["a red box"], seeds=[3], config=CFG, progress=False)
    assert one.prompts == ["a red box"] and torch.equal(one.images, listed.images)


def test_ddpm_sampler_is_seeded_per_image(tiny_model):
    cfg = SampleConfig(steps=3, scheduler="ddpm", batch_size=1)
    a = generate(tiny_model, ["a star", "a star"], seeds=[1, 2], config=cfg, progress=False)
    b = generate(tiny_model, ["a star"], seeds=[2], config=cfg, progress=False)
    assert torch.allclose(a.images[1], b.images[0], atol=1e-5)


def test_prompt_embeds_equal_prompts(tiny_model):
    prompts = ["a red box", "a blue star"]
    emb = encode_prompts(tiny_model, prompts)
    a = generate(tiny_model, prompts, seeds=[0, 1], config=CFG, progress=False)
    b = generate(tiny_model, prompt_embeds=emb, seeds=[0, 1], config=CFG, progress=False)
    assert torch.allclose(a.images, b.images, atol=1e-6)


def test_text_encoding_is_cached(tiny_model):
    tiny_model._text_cache.clear()
    calls = []
    handle = tiny_model.text_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        encode_prompts(tiny_model, ["a box", "a box", "a disc"])
        encode_prompts(tiny_model, ["a disc"])
    finally:
        handle.remove()
    assert calls == [2]


def test_the_text_cache_follows_edits_of_the_text_encoder(tiny_sd_dir):
    """Embeddings cached before the text encoder's weights change (fine-tuning, a loaded adapter, an in-place edit)
    are never served after it: the next call encodes again."""
    from diffshield.core.loading import load_t2i

    model = load_t2i(tiny_sd_dir)
    before = encode_prompts(model, ["a box"]).clone()
    weight = next(p for n, p in model.text_encoder.named_parameters() if n.endswith("final_layer_norm.weight"))
    with torch.no_grad():
        weight.mul_(2.0)
    after = encode_prompts(model, ["a box"])
    assert not torch.allclose(before, after)
    assert torch.allclose(after, model.text_encoder(model.tokenizer(
        ["a box"], padding="max_length", max_length=model.tokenizer.model_max_length,
        return_tensors="pt").input_ids)[0])
    model.text_encoder.load_state_dict(load_t2i(tiny_sd_dir).text_encoder.state_dict())  # copy_: back to the start
    assert torch.allclose(encode_prompts(model, ["a box"]), before)
    with torch.inference_mode():  # an encoder built in inference mode has no version counters: still encodes
        model.text_encoder = copy.deepcopy(model.text_encoder)
        assert torch.allclose(encode_prompts(model, ["a box"]), before)


def test_differentiable_path_gives_gradients(tiny_model):
    emb = encode_prompts(tiny_model, ["a red wedge"]).clone().requires_grad_(True)
    lat = initial_latents(tiny_model, [0]).requires_grad_(True)
    img = generate_differentiable(tiny_model, emb, lat, steps=2)
    img.mean().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert lat.grad is not None and lat.grad.abs().sum() > 0


def test_bad_inputs(tiny_model):
    with pytest.raises(DiffshieldError, match="one seed per image"):
        generate(tiny_model, ["a", "b"], seeds=[1], config=CFG, progress=False)
    with pytest.raises(DiffshieldError, match="steps"):
        SampleConfig(steps=0)
    with pytest.raises(DiffshieldError, match="scheduler"):
        SampleConfig(scheduler="euler")


def test_guidance_range_is_the_clis_everywhere(tiny_sd_dir, tmp_path):
    """The CLI and the prompt files accept guidance in [0, 100]; the configs behind them take the same range, so a
    value the CLI accepts is never refused later, in the middle of a run."""
    from diffshield.cli.main import main
    from diffshield.erase.esd import ESDConfig

    assert SampleConfig(guidance=100).guidance == 100
    with pytest.raises(DiffshieldError, match="between 0 and 100"):
        SampleConfig(guidance=100.5)
    assert ESDConfig(start_guidance=100, preserve=["a red circle"], preserve_guidance=100).start_guidance == 100
    assert main(["generate", "--model", str(tiny_sd_dir), "--prompt", "a red triangle", "--n", "1", "--steps", "1",
                 "--guidance", "75", "--out", str(tmp_path / "g")]) == 0


def test_save_roundtrip_loads_in_stock_diffusers(tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    tiny_model.save(tmp_path / "saved")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "saved")
    a = dict(pipe.unet.named_parameters())["conv_in.weight"]
    assert torch.equal(a, dict(tiny_model.unet.named_parameters())["conv_in.weight"])
    out = pipe("a red box", num_inference_steps=2, output_type="np").images
    assert out.shape == (1, 16, 16, 3)


def test_denoise_split_at_a_step_equals_the_whole_run(tiny_model):
    """stop_at=s then start_at=s is the same DDIM run as one call; with another prompt after s, it differs."""
    from diffshield.core.sampling import denoise

    lat = initial_latents(tiny_model, [0, 1])
    cond = encode_prompts(tiny_model, ["a red box", "a red box"])
    other = encode_prompts(tiny_model, ["a cat", "a cat"])
    uncond = encode_prompts(tiny_model, [""])
    with torch.no_grad():
        whole = denoise(tiny_model, lat, cond, uncond, steps=6)
        half = denoise(tiny_model, lat, cond, uncond, steps=6, stop_at=3)
        assert torch.allclose(denoise(tiny_model, half, cond, uncond, steps=6, start_at=3), whole, atol=1e-6)
        assert not torch.allclose(denoise(tiny_model, half, other, uncond, steps=6, start_at=3), whole, atol=1e-4)


@pytest.mark.parametrize("t", [17, torch.tensor([3, 500, 999])])
def test_denoising_target_follows_the_prediction_type(t):
    """ε for ε-models; for v-models the velocity (diffusers' own get_velocity), from which x0 comes back as
    √ᾱ x_t - √(1-ᾱ) v; x0 for sample-models; anything else refused."""
    from diffusers import DDPMScheduler

    from diffshield.core.errors import DiffshieldError
    from diffshield.core.sampling import denoising_target

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    tt = torch.as_tensor(t).expand(3) if torch.as_tensor(t).dim() == 0 else t
    eps_s = DDPMScheduler(beta_schedule="scaled_linear")
    assert denoising_target(eps_s, x0, noise, t) is noise
    v_s = DDPMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    v = denoising_target(v_s, x0, noise, t)
    assert torch.allclose(v, v_s.get_velocity(x0, noise, tt), atol=1e-6)
    a = v_s.alphas_cumprod[tt].reshape(-1, 1, 1, 1)
    x_t = v_s.add_noise(x0, noise, tt)
    assert torch.allclose(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, atol=1e-5)
    assert denoising_target(DDPMScheduler(prediction_type="sample"), x0, noise, t) is x0
    eps_s.register_to_config(prediction_type="flow")
    with pytest.raises(DiffshieldError, match="prediction_type 'flow'"):
        denoising_target(eps_s, x0, noise, t)


def test_a_stochastic_native_scheduler_is_seeded_per_image(tiny_sd_dir, tmp_path):
    """A model whose own scheduler draws noise at every step (Euler ancestral, common on SD 2.x and community
    models) gives, with --scheduler native, the same image for the same seed whatever the global RNG and the batch."""
    import json
    import shutil

    from diffusers import EulerAncestralDiscreteScheduler

    from diffshield.core.loading import load_t2i

    folder = tmp_path / "ea"
    shutil.copytree(tiny_sd_dir, folder)
    euler = EulerAncestralDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")
    euler.save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "EulerAncestralDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))
    model = load_t2i(folder)
    cfg = SampleConfig(steps=4, scheduler="native")
    torch.manual_seed(1)
    a = generate(model, ["a red triangle"], [3], config=cfg, progress=False).images
    torch.manual_seed(2)
    b = generate(model, ["a blue circle", "a red triangle"], [0, 3], config=cfg, progress=False).images
    assert torch.allclose(a[0], b[1], atol=1e-4)
    assert not torch.allclose(a[0], b[0], atol=1e-2)
