"""CUDA-graph replay of UNet calls (diffshield.core.graphs): eager where graphs do not apply, a self-check that
falls back to eager calls on a failed capture or a wrong replay, and (where a GPU exists) replays equal to eager
calls and following in-place weight updates."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffshield.core.graphs import GraphedUNet, graphed

HAS_CUDA = torch.cuda.is_available()


def tiny_unet(device: str = "cpu") -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).to(device).eval()


def inputs(device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g).to(device)
    c = torch.randn(2, 5, 16, generator=g).to(device)
    return x, torch.tensor(500, device=device), c


def test_graphed_leaves_a_cpu_unet_alone():
    unet = tiny_unet()
    assert graphed(unet) is unet


def test_cpu_calls_are_eager_and_equal():
    unet = tiny_unet()
    wrapped = GraphedUNet(unet)
    x, t, c = inputs()
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=c).sample
        out = wrapped(x, t, encoder_hidden_states=c).sample
    assert torch.equal(out, ref)
    assert wrapped.replays == 0 and wrapped.failed is None
    assert wrapped.config.sample_size == 8  # attributes come from the wrapped UNet


class _WrongGraph:
    """Stands in for a captured graph whose replay writes a wrong output."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def replay(self) -> None:
        self.out.fill_(123.0)


def test_a_wrong_replay_is_caught_and_eager_calls_take_over(monkeypatch):
    unet = tiny_unet()
    wrapped = GraphedUNet(unet)
    x, t, c = inputs()
    monkeypatch.setattr(wrapped, "_usable", lambda *a: wrapped.failed is None)
    out_buf = torch.zeros(2, 4, 8, 8)
    monkeypatch.setattr(wrapped, "_capture", lambda x, t, c, amp: (_WrongGraph(out_buf),
                                                                   (x.clone(), t.clone(), c.clone()), out_buf))
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=c).sample
        with pytest.warns(RuntimeWarning, match="CUDA graphs disabled"):
            out = wrapped(x, t, encoder_hidden_states=c).sample
        assert torch.equal(out, ref)  # the eager result, not the wrong replay
        assert "differs from the eager call" in wrapped.failed
        again = wrapped(x, t, encoder_hidden_states=c).sample  # eager from now on, no second capture
    assert torch.equal(again, ref)


def test_a_failed_capture_falls_back_to_eager(monkeypatch):
    unet = tiny_unet()
    wrapped = GraphedUNet(unet)
    x, t, c = inputs()
    monkeypatch.setattr(wrapped, "_usable", lambda *a: wrapped.failed is None)

    def boom(*a):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(wrapped, "_capture", boom)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="not permitted"):
        out = wrapped(x, t, encoder_hidden_states=c).sample
    with torch.no_grad():
        assert torch.equal(out, unet(x, t, encoder_hidden_states=c).sample)


def test_calls_with_gradients_are_eager():
    unet = tiny_unet()
    wrapped = GraphedUNet(unet)
    x, t, c = inputs()
    x.requires_grad_(True)
    wrapped(x, t, encoder_hidden_states=c).sample.sum().backward()
    assert x.grad is not None and wrapped.replays == 0


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_replays_equal_eager_calls_and_follow_in_place_updates():
    unet = tiny_unet("cuda")
    wrapped = graphed(unet)
    assert isinstance(wrapped, GraphedUNet)
    x, t, c = inputs("cuda")
    with torch.no_grad():
        for _ in range(3):
            out = wrapped(x, t, encoder_hidden_states=c).sample
            torch.testing.assert_close(out, unet(x, t, encoder_hidden_states=c).sample, rtol=1e-4, atol=1e-4)
        for p in unet.parameters():
            p.mul_(0.9)  # an optimiser-like in-place update
        out = wrapped(x + 1, t - 100, encoder_hidden_states=c).sample
        torch.testing.assert_close(out, unet(x + 1, t - 100, encoder_hidden_states=c).sample, rtol=1e-4, atol=1e-4)
    assert wrapped.failed is None and wrapped.replays == 4
