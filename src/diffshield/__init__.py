"""diffshield: erase, red-team, backdoor and protect text-to-image diffusion models."""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("diffshield")  # the installed package's metadata (pyproject.toml's version)
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0.1.0"

from diffshield.toyworld import names as _toy_names  # noqa: E402,F401  registers toy:t2i, toy:ddpm, ...
