"""The ESD training loop (Gandikota et al., ICCV 2023), with checkpoints and resumption."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffshield.core.device import autocast, autocast_dtype, to_device
from diffshield.core.errors import DiffshieldError
from diffshield.core.graphs import GraphedUNet, graphed
from diffshield.core.loading import T2IModel
from diffshield.core.sampling import check_model, encode_prompts, make_scheduler
from diffshield.erase.base import EraseResult, check_prompt_roles, fraction_of_unet, probe_values
from diffshield.erase.esd.checkpoint import checkpoint_cpu_seconds, load_checkpoint, run_identity, save_checkpoint
from diffshield.erase.esd.config import ESDConfig
from diffshield.erase.esd.params import esd_parameters
from diffshield.erase.esd.target import (
    esd_anchored_loss,
    esd_loss,
    esd_target,
    iteration_generator,
    kv_anchor_penalty,
    kv_anchor_terms,
    sample_xt,
)


def esd_autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ESD run: "auto" is bfloat16 on CUDA (float16 without bfloat16) and none on the CPU;
    "no" is none; "bf16" / "fp16" ask for one explicitly."""
    if mixed_precision == "auto":
        return autocast_dtype(device)
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]



def esd_erase(model: T2IModel, concepts: list[str], config: ESDConfig, progress: bool = True) -> EraseResult:
    """Erase concepts by ESD fine-tuning (Gandikota et al., ICCV 2023); edits ``model.unet`` in place.

    Each iteration i (batch 1 by default; ``batch_size`` B): the concepts are ``concepts[(i B + j) % n]``,
    j < B (the official code draws one at random); a CPU generator seeded from (``config.seed``, i) draws
    k ~ U{0..N-1} and the B starting noises; x_t = DDIM sampling (eta 0, CFG ``start_guidance``, prompt c) for
    k steps with the *current*, partly fine-tuned UNet, as in the paper's code (``sample_with="frozen"``: the
    frozen UNet, as the official ``esd_sd.py`` does); t = the DDIM timestep at step k; target = ε*(x_t, ∅, t) −
    η [ε*(x_t, c, t) − ε*(x_t, ∅, t)] from a frozen copy θ* of the original UNet (``target_base="concept"``: from
    ε*(x_t, c, t), as ``esd_sd.py``); loss = MSE(ε_θ(x_t, c, t),
    target); one Adam step on the ESD-x/u parameters. With ``config.preserve`` (beyond the paper), one anchor prompt
    c_p per batch element is sampled alongside (same k) and ``preserve_weight`` · MSE(ε_θ(x_p, c_p, t),
    ε*(x_p, c_p, t)) is added to the loss; ``preserve_at="own+concept"`` also adds the MSE of every distinct
    anchor prompt's prediction at the concept's x_t. With ``config.erase_from`` (the official diffusers scripts'),
    x_t is sampled with the broader prompt f paired with c, and the loss is MSE(ε_θ(x_t, f, t), ε*(x_t, f, t) −
    η [ε*(x_t, c, t) − ε*(x_t, ∅, t)]).

    Args:
        model: the text-to-image model; its UNet is fine-tuned in place and left in eval mode without grads.
        concepts: prompts naming the concepts to erase (e.g. ["Van Gogh"], ["nudity"]).
        config: ESD hyper-parameters (:class:`ESDConfig`); ``checkpoint_dir`` enables checkpoints and resuming.
        progress: show a progress bar with the loss (default True).

    Returns:
        EraseResult with ``changed`` = the fine-tuned parameters that differ from the original, and ``extra`` =
        {"losses": per-iteration loss (resumed runs include the earlier part), "timesteps": t per iteration,
        "seconds_per_iteration": mean over this call's iterations (None if none ran), "iteration_seconds": each of
        this call's iterations (sampling x_t included: it grows with the drawn step k), "resumed_from": iteration
        the run started at, "trained_parameters": number of fine-tuned parameter elements, "preserve_losses": the
        anchor term per iteration of this call (empty without ``preserve``), "cuda_graphs": on CUDA with
        ``config.cuda_graphs``, {"replays": graph replays of the sampler, "failed": why its graphs were given up or
        None, "target": the same for θ*'s target call, or "the sampler's graphs" when it samples with θ* (its
        replays are then counted in "replays")}, else None}.
    """
    if isinstance(concepts, str):
        concepts = [concepts]
    concepts = list(concepts or [])
    if not concepts or any(not isinstance(c, str) or not c.strip() for c in concepts):
        raise DiffshieldError(f"give at least one non-empty concept prompt to erase, got {concepts!r}")
    if not isinstance(config, ESDConfig):
        raise DiffshieldError(f"esd_erase needs an ESDConfig, got {type(config).__name__}")
    check_prompt_roles(concepts, preserve=config.preserve)
    if len(config.erase_from) not in (0, 1, len(concepts)):
        raise DiffshieldError(f"give one erase_from prompt per concept ({len(concepts)}) or one for all, got "
                              f"{len(config.erase_from)}")
    check_model(model)
    start_time = time.perf_counter()
    unet = model.unet
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    amp = esd_autocast_dtype(config.mixed_precision, device)

    # θ*: a frozen copy of the original UNet; θ: the model's own UNet, of which only the ESD-x/u set trains.
    identity = run_identity(model, concepts, config)
    frozen = copy.deepcopy(unet).eval().requires_grad_(False)
    params = esd_parameters(unet, config.variant, config.freeze_time_and_out, config.x_params)
    originals = None
    if amp is not None and amp != dtype:  # θ* in the autocast dtype; the trained set's float32 values kept aside
        frozen.to(amp)
        originals = {n: p.detach().clone() for n, p in params.items()}
    unet.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(list(params.values()), lr=config.lr)

    # Text embeddings, computed once.
    n_c, bsz, n_p = len(concepts), config.batch_size, len(config.preserve)
    froms = config.erase_from * (n_c if len(config.erase_from) == 1 else 1)
    emb = encode_prompts(model, [*concepts, *config.preserve, *froms, ""]).to(device, dtype)
    conds, keeps, uncond = emb[:n_c], emb[n_c : n_c + n_p], emb[-1:]
    bases = emb[n_c + n_p : -1] if froms else None  # erase_from: the broader prompts, sampled and trained
    distinct = keeps[[config.preserve.index(q) for q in dict.fromkeys(config.preserve)]]  # first of each prompt
    kv_anchor = kv_anchor_terms(params, distinct) if config.kv_anchor_weight else []
    sampler = model if config.sample_with == "current" else dataclasses.replace(model, unet=frozen)
    low = None  # mixed precision: the current UNet's values, in the autocast dtype, for sampling x_t
    if config.sample_with == "current" and originals is not None:
        low_unet = copy.deepcopy(frozen).eval()  # θ* in the autocast dtype; trained values copied in per iteration
        low = [(p, low_unet.get_parameter(n)) for n, p in params.items()]
        sampler = dataclasses.replace(model, unet=low_unet)
    target_unet = frozen  # θ*'s calls without gradients: the target, and the anchors' targets with ``preserve``
    if config.cuda_graphs and model.device.type == "cuda":  # sampling x_t is overhead-bound on a GPU
        sampler = dataclasses.replace(sampler, unet=graphed(sampler.unet))
        # the target call replays graphs too: the sampler's own when it samples with θ*, else graphs of θ*
        target_unet = sampler.unet if getattr(sampler.unet, "unet", None) is frozen else graphed(frozen)
    sched = make_scheduler(model, "ddim")
    sched.set_timesteps(config.ddim_steps)
    timesteps = sched.timesteps

    start, losses, ts_used, iter_seconds, keep_losses = 0, [], [], [], []
    cpu_before, cpu0 = 0.0, time.process_time()
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    try:
        if ckpt_dir is not None:
            resumed = load_checkpoint(ckpt_dir, identity, params, optimizer, config.iterations)
            if resumed is not None:
                start, losses, ts_used = resumed
                cpu_before = checkpoint_cpu_seconds(ckpt_dir)
                if progress:
                    print(f"resuming from iteration {start} of {config.iterations} (checkpoint in {ckpt_dir})")
        unet.train()
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        bar = tqdm(range(start, config.iterations), desc=f"ESD-{config.variant}", disable=not progress, leave=False)
        for i in bar:
            with autocast(device, enabled=amp is not None, dtype=amp):
                t0 = time.perf_counter()
                rows = [(i * bsz + j) % n_c for j in range(bsz)]
                cond = conds[rows]
                train = cond if bases is None else bases[rows]  # the prompt whose prediction is trained
                gen = iteration_generator(config.seed, i)
                k = int(torch.randint(config.min_step, config.ddim_steps, (1,), generator=gen))
                noise = to_device(torch.randn((bsz, *model.latent_shape), generator=gen), device, dtype)
                t = to_device(timesteps[k], device)
                if low is not None:  # sample with the current weights, rounded once instead of per forward pass
                    with torch.no_grad():
                        torch._foreach_copy_([q for _, q in low], [p for p, _ in low])

                if n_p:  # anchor x_t^p: same k, noises drawn after the concepts' (runs without an anchor: unchanged)
                    cond_p = keeps[[(i * bsz + j) % n_p for j in range(bsz)]]
                    noise_p = to_device(torch.randn((bsz, *model.latent_shape), generator=gen), device, dtype)
                    both = sample_xt(sampler, torch.cat([train, cond_p]), uncond, k, torch.cat([noise, noise_p]),
                                     config.ddim_steps, config.start_guidance)
                    x_t, x_p = both.split([bsz, bsz])
                    guided = None
                    with torch.no_grad():
                        if config.preserve_guidance == 1.0:
                            target_p = target_unet(x_p, t, encoder_hidden_states=cond_p).sample
                        else:  # the guided prediction a sampler at scale s uses
                            guided = (config.preserve_guidance, uncond.expand(bsz, -1, -1))
                            e_c, e_u = target_unet(torch.cat([x_p, x_p]), t, encoder_hidden_states=torch.cat(
                                [cond_p, guided[1]])).sample.chunk(2)
                            target_p = e_u + config.preserve_guidance * (e_c - e_u)
                    shared = None
                    if config.preserve_at == "own+concept":  # every distinct anchor at each concept x_t
                        x_s = x_t.repeat_interleave(len(distinct), 0)
                        c_s = distinct.repeat(bsz, 1, 1)
                        with torch.no_grad():
                            shared = (x_s, c_s, target_unet(x_s, t, encoder_hidden_states=c_s).sample)
                else:
                    x_t = sample_xt(sampler, train, uncond, k, noise, config.ddim_steps, config.start_guidance)
                target = esd_target(target_unet, x_t, t, cond, uncond, config.eta,
                                    None if bases is None else train, config.target_base)
                optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    if n_p:
                        loss, keep = esd_anchored_loss(unet, x_t, t, train, target, x_p, cond_p, target_p,
                                                       config.preserve_weight, shared, guided)
                        keep_losses.append(float(keep.detach()))
                    else:
                        loss = esd_loss(unet, x_t, t, train, target)
                    if kv_anchor:
                        loss = loss + config.kv_anchor_weight * kv_anchor_penalty(kv_anchor)
                    loss.backward()
                optimizer.step()

                losses.append(float(loss.detach()))
                ts_used.append(int(timesteps[k]))
                iter_seconds.append(time.perf_counter() - t0)
                bar.set_postfix(loss=f"{losses[-1]:.4g}", t=ts_used[-1])
                done = i + 1
                if ckpt_dir is not None and (done % config.checkpoint_every == 0 or done == config.iterations):
                    save_checkpoint(ckpt_dir, done, identity, params, optimizer, losses, ts_used,
                                    cpu_before + time.process_time() - cpu0)
    finally:
        optimizer.zero_grad(set_to_none=True)
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        model.eval()

    before = originals if originals is not None else dict(frozen.named_parameters())
    changed = {n: p.detach().to("cpu").clone() for n, p in params.items() if not torch.equal(p, before[n])}
    base_values = {n: probe_values(before[n]) for n in changed}
    del frozen, before, originals
    return EraseResult(
        model=model,
        changed=changed,
        method=f"esd-{config.variant}",
        config=asdict(config),
        seconds=time.perf_counter() - start_time,
        fraction_changed=fraction_of_unet(unet, list(changed)),
        base_values=base_values,
        extra={
            "losses": losses,
            "timesteps": ts_used,
            "seconds_per_iteration": (sum(iter_seconds) / len(iter_seconds)) if iter_seconds else None,
            "iteration_seconds": iter_seconds,
            "resumed_from": start,
            "cpu_seconds_total": cpu_before + time.process_time() - cpu0,
            "trained_parameters": sum(p.numel() for p in params.values()),
            "sampling_model": config.sample_with,
            "preserve_losses": keep_losses,
            "cuda_graphs": ({"replays": sampler.unet.replays, "failed": sampler.unet.failed,
                             "target": ("the sampler's graphs" if target_unet is sampler.unet else
                                        {"replays": target_unet.replays, "failed": target_unet.failed})}
                            if isinstance(sampler.unet, GraphedUNet) else None),
        },
    )


