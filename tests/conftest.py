"""Fixtures: tiny random diffusers components saved as a StableDiffusionPipeline folder (the Hub is unreachable)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from diffshield.toyworld.shapes import VOCAB_WORDS
from diffshield.toyworld.tokenizer import build_tokenizer_files


def build_tiny_pipeline(folder, seed: int = 0):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok_dir = build_tokenizer_files(VOCAB_WORDS, folder.parent / f"{folder.name}_tok", model_max_length=77)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        cross_attention_dim=8, norm_num_groups=2, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        layers_per_block=1,
    )
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=8,
    ))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random StableDiffusionPipeline folder (16 px images, 4 x 8 x 8 latents). Do not modify it."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture()
def tiny_sd_copy(tiny_sd_dir, tmp_path):
    """A private copy of the tiny pipeline folder, for tests that damage it."""
    import shutil

    dst = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, dst)
    return dst


@pytest.fixture(scope="session")
def tiny_model(tiny_sd_dir):
    from diffshield.core.loading import load_t2i

    return load_t2i(tiny_sd_dir)


def pytest_configure(config):
    """Under ``benchmarks/mutations.py``: switch off the mechanism named by DIFFSHIELD_MUTATION before any test
    module is imported, so that the tests which cover it can be seen to fail."""
    name = os.environ.get("DIFFSHIELD_MUTATION")
    if name:
        path = Path(__file__).resolve().parent.parent / "benchmarks" / "mutations.py"
        spec = importlib.util.spec_from_file_location("diffshield_mutations", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        mod.apply(name)


def worker_threads() -> int:
    """This pytest process's share of the machine's cores: all of them without pytest-xdist, else cores / workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture(autouse=True)
def _torch_threads_per_worker():
    """Every test starts with torch on at most its worker's share of the cores (fewer where a module asks for one
    thread). Torch's default (every core) in each of ``make test``'s two workers puts four busy threads on two cores,
    which doubles the time of anything compute-bound (two 32-image generations side by side: 48 s each on two
    threads, 25 s each on one); and a test that runs a command with ``--threads N`` would otherwise leave N behind for
    the next test on its worker."""
    torch.set_num_threads(min(torch.get_num_threads(), worker_threads()))
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a whole module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the toy and
    tiny models' tensors are too small for intra-op threads, which only add overhead, and on a shared CPU extra
    OpenMP threads spin."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def sensitive_inpainter():
    """(inpainter, green): a hand-built inpainter that paints green when the context carries a faint +-1 pattern (a
    high-gain, LaMa-like reaction to faint cues) and grey otherwise; Attack as Defense can drive it to its target."""
    from diffshield.protect.inpainters import FnInpainter

    torch.manual_seed(0)
    pattern = torch.randn(1, 3, 32, 32).sign()
    green = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1)

    def fn(x, m):
        ctx = (x - 0.6) * (1 - m)
        score = (ctx * pattern).sum(dim=(1, 2, 3), keepdim=True) / (3 * (1 - m).sum(dim=(1, 2, 3), keepdim=True))
        a = torch.sigmoid(1000 * score - 5)
        return (1 - a) * 0.6 + a * green

    return FnInpainter(fn), green


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Start the tests marked ``long(seconds)`` first, the longest first (seconds: a rough single-core time, used only
    for this order). With ``make test``'s two workers, which take one test at a time (``--maxschedchunk 1``), the
    long tests then run side by side from the start and the short ones fill in at the end, instead of one worker
    finishing a long test alone."""

    def key(item):
        mark = item.get_closest_marker("long")
        return -(mark.args[0] if mark and mark.args else 0)

    items.sort(key=key)  # stable: the file order otherwise
