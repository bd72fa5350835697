"""Architectures of the toy world's models, as stock diffusers / transformers components.

The text-to-image model is a genuine Stable-Diffusion-shaped latent diffusion model, scaled down for a CPU:
32 px images, an AutoencoderKL to 4 x 8 x 8 latents, a UNet2DConditionModel with cross-attention in every block,
a CLIPTextModel trained with it, a word-level CLIPTokenizer and a DDIM scheduler with SD 1.x's noise schedule.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

IMAGE_SIZE = 32
LATENT_SIZE = 8
TEXT_WIDTH = 64
MAX_TOKENS = 77

#: SD 1.x noise schedule, shared by training (DDPM) and sampling (DDIM).
SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
)


def make_vae() -> AutoencoderKL:
    """AutoencoderKL 32 px -> 4 x 8 x 8 (~1 M parameters)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def make_unet() -> UNet2DConditionModel:
    """UNet2DConditionModel on 8 x 8 latents, cross-attention in both resolutions (~6 M parameters)."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def make_text_encoder(vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> CLIPTextModel:
    """A 3-layer CLIPTextModel of width 64."""
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_WIDTH,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    return CLIPTextModel(cfg)


def make_train_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE)


def make_sample_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SCHEDULE, set_alpha_to_one=False, steps_offset=1)
