"""Backdoors in diffusion models: implant one (BadDiffusion, Chou et al., CVPR 2023) to study it, find one
(TERD, Mo et al., ICML 2024).

Modules: ``ddpm`` (the toy unconditional DDPM: build, train, load), ``triggers`` (triggers and targets),
``baddiffusion`` (the poisoned fine-tuning), ``sampling`` (own sampling loop with initial-noise injection),
``metrics`` (MSE, ASR, SSIM, clean-sample quality), ``terd`` (trigger reversion, input and model detection).
"""
