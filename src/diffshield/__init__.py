"""diffshield: erase, red-team, backdoor and protect text-to-image diffusion models."""

__version__ = "0.1.0"
