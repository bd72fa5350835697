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


# ---- GraphedSequence: the UNet calls of an iteration with gradients (TERD), checked on the CPU with stand-in makers


def _terd_runs(monkeypatch, maker, learn_gamma: bool = False):
    """TERD (3 + 3 iterations, batch 2, 4 DDIM steps) on the shipped backdoored DDPM, eagerly and with every
    iteration's calls going through GraphedSequence with ``maker`` standing in for make_graphed_callables; returns
    both results, what the maker was handed and the sequences."""
    from diffshield.backdoor import terd as terd_mod
    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.terd import TERDConfig, reverse_trigger
    from diffshield.core.graphs import GraphedSequence

    model = load_ddpm("toy:ddpm-box-corner")
    cfg = TERDConfig(stage1_iters=3, stage2_iters=3, batch_size=2, ddim_steps=4, learn_gamma=learn_gamma)
    eager = reverse_trigger(model, cfg, progress=False)
    made, seqs = [], []

    def recording_maker(fns, samples):
        made.append([tuple(a.shape) for a, _ in samples])
        assert all(a.requires_grad and not t.requires_grad for a, t in samples)
        return maker(fns, samples)

    class Forced(GraphedSequence):  # as on a CUDA device
        def __init__(self, fn, enabled=True):
            super().__init__(fn, enabled=True, maker=recording_maker)
            seqs.append(self)

    monkeypatch.setattr(terd_mod, "GraphedSequence", Forced)
    return eager, reverse_trigger(model, cfg, progress=False), made, seqs


def aliasing_maker(fns, samples):
    """A CPU stand-in for make_graphed_callables with its memory behaviour: each call slot copies its input into a
    fixed buffer and returns its output, and in the backward pass its input gradient, as aliases of fixed buffers
    that the slot's next call overwrites."""
    def one(fn, sx, st):
        sx, st, keep = sx.detach().clone().requires_grad_(True), st.clone(), {}
        so, sgi = torch.empty_like(fn(sx, st)), torch.empty_like(sx)

        class Slot(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x, t):
                sx.data.copy_(x)
                st.copy_(t)
                with torch.enable_grad():
                    keep["out"] = fn(sx, st)
                so.copy_(keep["out"].detach())
                return so.detach()

            @staticmethod
            @torch.autograd.function.once_differentiable
            def backward(ctx, g):
                (gi,) = torch.autograd.grad(keep.pop("out"), sx, g)
                sgi.copy_(gi)
                return sgi.detach(), None

        return lambda x, t: Slot.apply(x, t)

    return tuple(one(fn, sx, st) for fn, (sx, st) in zip(fns, samples))


@pytest.mark.parametrize("learn_gamma", [False, True])
def test_terd_iterations_replayed_per_call_slot_equal_eager_ones(monkeypatch, learn_gamma):
    """The first iteration of each stage records its calls (stage 1: one UNet call on 2 x 2 images; stage 2: the
    DDIM steps on 2 and the loss's call on 4 x 2), the second is checked, the rest replay: with a maker that keeps
    make_graphed_callables' fixed buffers (outputs and gradients overwritten by the slot's next call) every figure
    equals the eager run's bit for bit, so nothing in TERD holds a replayed output past its use."""
    eager, seq, made, seqs = _terd_runs(monkeypatch, aliasing_maker, learn_gamma)
    from diffshield.backdoor.terd import quad_timesteps

    steps = len(quad_timesteps(1000, 4)) if learn_gamma else 4
    assert made == [[(4, 3, 32, 32)], [(2, 3, 32, 32)] * steps + [(8, 3, 32, 32)]]
    assert [s.status() for s in seqs] == [{"replays": 2, "failed": None}, {"replays": 2, "failed": None}]
    assert torch.equal(seq.r, eager.r) and seq.history == eager.history
    if learn_gamma:
        assert torch.equal(seq.gamma, eager.gamma)


def test_a_wrong_replay_gives_the_graphs_up_and_keeps_the_eager_iteration(monkeypatch):
    def wrong(fns, samples):
        return tuple((lambda x, t, f=f: f(x, t) * 1.1) for f in fns)  # (an offset cancels in TERD's losses)

    with pytest.warns(RuntimeWarning, match="CUDA graphs disabled.*loss differs from the eager iteration"):
        eager, seq, _, seqs = _terd_runs(monkeypatch, wrong)
    assert all(s.failed and s.replays == 0 for s in seqs)
    assert torch.equal(seq.r, eager.r) and seq.history == eager.history


def test_a_failed_capture_runs_eagerly(monkeypatch):
    def fails(fns, samples):
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning, match="not permitted when stream is capturing"):
        eager, seq, _, seqs = _terd_runs(monkeypatch, fails)
    assert all(s.failed for s in seqs) and torch.equal(seq.r, eager.r)


def _toy_iteration(seq, gen: torch.Generator, w: torch.Tensor, calls: int = 2, t=None):
    def body() -> torch.Tensor:
        x = torch.randn(3, 4, generator=gen) + w
        for _ in range(calls):
            x = seq(x, torch.tensor(1.0) if t is None else t).sample
        loss = x.pow(2).sum()
        loss.backward()
        return loss
    return body


def test_a_call_that_cannot_be_graphed_reruns_the_iteration_eagerly_from_the_same_draws():
    from diffshield.core.graphs import GraphedSequence

    fn = lambda x, t: torch.tanh(x * t)  # noqa: E731
    w = torch.zeros(4, requires_grad=True)
    plain = GraphedSequence(fn, enabled=False)
    ref = plain.iteration(_toy_iteration(plain, torch.Generator().manual_seed(0), w, t=2), torch.Generator(), [w])
    ref_grad = w.grad.clone()
    seq = GraphedSequence(fn, maker=lambda fns, samples: fns)
    gen = torch.Generator().manual_seed(0)
    with pytest.warns(RuntimeWarning, match="timestep not a tensor"):
        loss = seq.iteration(_toy_iteration(seq, gen, w, t=2), gen, [w])
    assert torch.equal(loss, ref) and torch.equal(w.grad, ref_grad) and seq.failed


def test_an_iteration_with_more_or_fewer_calls_than_recorded_is_an_error():
    from diffshield.core.graphs import GraphedSequence

    w = torch.zeros(4, requires_grad=True)
    seq = GraphedSequence(lambda x, t: torch.tanh(x * t), maker=lambda fns, samples: fns)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # record, check, replay
        seq.iteration(_toy_iteration(seq, gen, w), gen, [w])
    assert seq.status() == {"replays": 2, "failed": None}
    with pytest.raises(RuntimeError, match="more than the 2 calls recorded"):
        seq.iteration(_toy_iteration(seq, gen, w, calls=3), gen, [w])
    with pytest.raises(RuntimeError, match="made 1 calls; 2 were recorded"):
        seq.iteration(_toy_iteration(seq, gen, w, calls=1), gen, [w])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_terd_on_cuda_replays_graphs_that_agree_with_eager_iterations():
    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.backdoor.terd import TERDConfig, reverse_trigger

    model = load_ddpm("toy:ddpm-box-corner", device="cuda")
    cfg = TERDConfig(stage1_iters=20, stage2_iters=20, batch_size=4)
    with_graphs = reverse_trigger(model, cfg, progress=False)
    eager = reverse_trigger(model, TERDConfig(**{**cfg.__dict__, "cuda_graphs": False}), progress=False)
    assert with_graphs.cuda_graphs == {"stage1": {"replays": 19, "failed": None},
                                       "stage2": {"replays": 19, "failed": None}}
    short = reverse_trigger(model, TERDConfig(stage1_iters=20, stage2_iters=2, batch_size=4), progress=False)
    assert short.cuda_graphs["stage2"] == {"replays": 0, "failed": None}  # too short a stage to gain: eager
    torch.testing.assert_close(with_graphs.r, eager.r, rtol=1e-3, atol=1e-4)


def test_a_call_unlike_the_recorded_one_is_an_error_and_a_loss_near_zero_is_compared_absolutely():
    from diffshield.core.graphs import GraphedSequence

    w = torch.zeros(4, requires_grad=True)
    seq = GraphedSequence(lambda x, t: torch.tanh(x * t), maker=aliasing_maker)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        seq.iteration(_toy_iteration(seq, gen, w), gen, [w])
    wider = GraphedSequence(lambda x, t: torch.tanh(x * t), maker=aliasing_maker)

    def body_of(n: int):
        def body() -> torch.Tensor:
            x = torch.randn(n, 4, generator=gen) + w
            loss = wider(x, torch.tensor(1.0)).sample.pow(2).sum()
            loss.backward()
            return loss
        return body

    for _ in range(2):
        wider.iteration(body_of(3), gen, [w])
    with pytest.raises(RuntimeError, match=r"call 0 of the iteration got \(\(5, 4\)"):
        wider.iteration(body_of(5), gen, [w])  # copied into a (3, 4) buffer it would broadcast or fail
    # a loss that is a difference near 0 (a penalty subtracted) differs by rounding only: not a failed replay
    from diffshield.core.graphs import GraphedSequence as GS

    GS._compare(torch.tensor(1e-7), torch.tensor(2e-7), [torch.ones(3)], [torch.ones(3)])
    with pytest.raises(RuntimeError, match="loss differs"):
        GS._compare(torch.tensor(1e-7), torch.tensor(0.5), [torch.ones(3)], [torch.ones(3)])
    seq.release()
    assert seq.iteration(_toy_iteration(seq, gen, w), gen, [w]) is not None and seq.status()["replays"] == 2
