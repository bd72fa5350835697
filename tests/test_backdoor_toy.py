"""Quick end-to-end checks on the shipped toy DDPM (toy:ddpm), its backdoored example and the TERD calibration."""

from __future__ import annotations

import torch

from diffshield.backdoor.ddpm import load_ddpm
from diffshield.backdoor.sampling import SampleConfig, sample
from diffshield.backdoor.terd import Calibration, default_calibration_path
from diffshield.toyworld.names import TOY_ROOT


def test_toy_ddpm_loads_with_stock_diffusers_and_samples():
    from diffusers import DDPMPipeline, UNet2DModel

    pipe = DDPMPipeline.from_pretrained(TOY_ROOT / "ddpm")
    assert isinstance(pipe.unet, UNet2DModel) and pipe.unet.config.sample_size == 32
    model = load_ddpm("toy:ddpm")
    assert model.image_shape == (3, 32, 32) and model.scheduler.config.num_train_timesteps == 1000
    res = sample(model, [0, 1], config=SampleConfig("ddim", 5))
    assert res.images.shape == (2, 3, 32, 32) and 0 <= res.images.min() and res.images.max() <= 1
    again = sample(model, [1], config=SampleConfig("ddim", 5))
    # Same seed, same image whatever the batch: the noise comes from the seed's own generator. Batches of 1 and 2 take
    # different BLAS paths on some CPUs, so allow float reordering (observed 1.6e-5), far below one 8-bit level.
    torch.testing.assert_close(res.images[1], again.images[0], rtol=0, atol=1e-4)
    other = sample(model, [2], config=SampleConfig("ddim", 5))
    assert (other.images[0] - again.images[0]).abs().max() > 0.05  # another seed is another image


def test_shipped_example_and_calibration():
    cal = Calibration.load(default_calibration_path())
    for preset, th in cal.thresholds.items():
        assert th["mean_kl"] > 0 and th["var_kl"] > 0, preset
    assert "fast" in cal.thresholds and cal.method
    ex = TOY_ROOT / "ddpm" / "examples" / "box_corner"
    model = load_ddpm(ex)
    assert model.info["backdoor"]["trigger"] == "box" and (ex / "backdoor.safetensors").exists()
