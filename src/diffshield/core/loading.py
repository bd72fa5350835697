"""Load models as components (UNet, VAE, text encoder, tokenizer, scheduler), safely.

A model is given either as a path to a diffusers folder (``StableDiffusionPipeline`` layout: ``model_index.json``
plus ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``) or as the name of a shipped toy model (``toy:t2i``).
Weights are read from safetensors only; pickled weights (``.bin``, ``.ckpt``, ``.pt``) are refused unless the
caller passes ``allow_pickle=True`` (CLI: ``--allow-pickle``), because unpickling can run arbitrary code.
Every problem raises :class:`DiffshieldError` with a one-line message.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffshield.core.errors import DiffshieldError

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
T2I_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
KNOWN_KINDS = {
    "DDPMPipeline": "an unconditional DDPMPipeline (UNet2DModel + scheduler)",
    "DDIMPipeline": "an unconditional DDIMPipeline (UNet2DModel + scheduler)",
    "StableDiffusionInpaintPipeline": "a StableDiffusionInpaintPipeline (9-channel inpainting UNet)",
    "StableDiffusionXLPipeline": "a StableDiffusionXLPipeline (two text encoders; not supported yet)",
}


def resolve_model_path(spec: str | Path) -> Path:
    """Turn a named model (``toy:<name>``, see :data:`diffshield.core.registry.MODEL_NAMES`) or a path into an
    existing folder path, or raise a one-line DiffshieldError."""
    from diffshield.core.registry import MODEL_NAMES

    s = str(spec)
    if s in MODEL_NAMES or s.startswith("toy:"):
        if s not in MODEL_NAMES:
            raise DiffshieldError(f"unknown toy model {s!r}; shipped toy models: {', '.join(MODEL_NAMES.names())}")
        path = MODEL_NAMES.get(s)
        if not path.exists():
            raise DiffshieldError(
                f"shipped toy model {s!r} is missing at {path}; rebuild it with 'diffshield toyworld train'"
            )
        return path
    path = Path(s).expanduser()
    if not path.exists():
        raise DiffshieldError(f"model path '{path}' does not exist; give a diffusers model folder "
                              f"or a shipped toy model ({', '.join(MODEL_NAMES.names())})")
    if path.is_file():
        raise DiffshieldError(
            f"'{path}' is a single file; give a diffusers folder (model_index.json + component folders), e.g. "
            "a single-file checkpoint converted with StableDiffusionPipeline.from_single_file(path).save_pretrained("
            "folder)"
        )
    return path


#: the config keys that make two text-to-image models the same architecture (one's weights fit the other's)
ARCHITECTURE_KEYS = {"unet": ("in_channels", "sample_size", "cross_attention_dim", "block_out_channels",
                              "layers_per_block", "attention_head_dim"),
                     "text_encoder": ("hidden_size", "num_hidden_layers", "vocab_size")}


def t2i_architecture(spec: str | Path) -> dict:
    """The architecture of a text-to-image model folder, read from its components' ``config.json`` without loading
    weights: {"unet.<key>": value, "text_encoder.<key>": value} for :data:`ARCHITECTURE_KEYS` (absent files or
    keys are left out)."""
    root, out = resolve_model_path(spec), {}
    for component, keys in ARCHITECTURE_KEYS.items():
        try:
            config = json.loads((root / component / "config.json").read_text())
        except (OSError, ValueError):
            continue
        out.update({f"{component}.{k}": config[k] for k in keys if k in config})
    return out


def architecture_mismatch(a: str | Path, b: str | Path) -> str | None:
    """How model ``b``'s architecture differs from model ``a``'s (the first differing key), or None when every key
    both configs give agrees."""
    arch_a, arch_b = t2i_architecture(a), t2i_architecture(b)
    for key in arch_a:
        if key in arch_b and arch_a[key] != arch_b[key]:
            return f"{key} is {arch_a[key]} in '{a}' and {arch_b[key]} in '{b}'"
    return None


def check_safetensors(path: Path) -> dict:
    """Raise DiffshieldError if a .safetensors file is truncated or its header is corrupt (reads the header only).
    Returns the header (tensor name -> dtype, shape, offsets)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise ValueError("header length points past the end of the file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise DiffshieldError(f"safetensors file '{path}' is corrupt ({e}); re-download or re-save it") from None
    if size != 8 + n + end:
        raise DiffshieldError(
            f"safetensors file '{path}' is truncated or corrupt ({size} bytes, its header describes {8 + n + end}); "
            "re-download or re-save it"
        )
    return header


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def stored_dtype(folder: Path, variant: str | None = None) -> torch.dtype | None:
    """The floating-point dtype most tensors of a component folder's safetensors weights (of ``variant``) are stored
    in, read from the file headers; None when the folder has no such file (pickled weights are not opened)."""
    counts: dict[torch.dtype, int] = {}
    for f in sorted(folder.glob("*.safetensors")):
        if file_variant(f.name) != variant:
            continue
        for name, info in check_safetensors(f).items():
            dt = SAFETENSORS_DTYPES.get(info.get("dtype")) if name != "__metadata__" else None
            if dt is not None:
                counts[dt] = counts.get(dt, 0) + 1
    return max(counts, key=counts.get) if counts else None


def check_component_weights(folder: Path, allow_pickle: bool) -> bool:
    """Validate the weight files of one component folder. Returns True if it must be loaded from safetensors."""
    safes = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if safes:
        for p in safes:
            check_safetensors(p)
        return True
    if pickles:
        if not allow_pickle:
            raise DiffshieldError(
                f"refusing pickled weights '{pickles[0]}': unpickling can run arbitrary code; convert the model to "
                "safetensors, or pass --allow-pickle if you trust this file"
            )
        return False
    raise DiffshieldError(f"component folder '{folder}' has no weight file (*.safetensors)")


def file_variant(name: str) -> str | None:
    """The weight variant a file name carries (``model.fp16.safetensors`` and shards
    ``model-00001-of-00002.fp16.safetensors`` -> ``"fp16"``), None for a plain name (``model.safetensors``)."""
    parts = re.sub(r"-\d+-of-\d+", "", name).split(".")
    return parts[-2] if len(parts) > 2 else None


def weight_variant(folder: Path, safetensors: bool = True) -> str | None:
    """The diffusers weight variant to load from a component folder (of the safetensors files, or with
    ``safetensors=False`` of the pickled ones): None when it holds plain weight files (``model.safetensors``,
    ``diffusion_pytorch_model.safetensors`` or their shards), else the one variant its files carry, as
    ``save_pretrained(variant="fp16")`` writes them (``diffusion_pytorch_model.fp16.safetensors`` -> ``"fp16"``).
    Several variants and no plain file: a one-line error."""
    suffixes = (".safetensors",) if safetensors else PICKLE_SUFFIXES
    variants = set()
    for f in folder.iterdir():
        if f.suffix not in suffixes:
            continue
        variant = file_variant(f.name)
        if variant is None:
            return None
        variants.add(variant)
    if len(variants) > 1:
        raise DiffshieldError(f"'{folder}' holds weights of several variants ({', '.join(sorted(variants))}) and no "
                              "plain weight file; keep the files of one variant in that folder")
    return next(iter(variants), None)


def read_model_index(path: Path) -> dict:
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise DiffshieldError(
            f"'{path}' is not a diffusers model folder (no model_index.json); save one with "
            "StableDiffusionPipeline.save_pretrained or point at its top folder"
        )
    try:
        return json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise DiffshieldError(f"'{index_file}' is not valid JSON ({e.msg} at line {e.lineno})") from None


@dataclass
class T2IModel:
    """A text-to-image latent diffusion model as components (Stable Diffusion layout).

    Attributes: unet (UNet2DConditionModel), vae (AutoencoderKL), text_encoder (CLIPTextModel), tokenizer
    (CLIPTokenizer), scheduler (the folder's scheduler), source (where it was loaded from), stored_dtypes (the dtype
    each network's weight files were stored in, as :func:`load_t2i` read them; :meth:`save` writes that dtype back).
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    source: str = ""
    stored_dtypes: dict = field(default_factory=dict, repr=False)
    _text_cache: dict = field(default_factory=dict, repr=False)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = int(self.unet.config.sample_size)
        return (int(self.unet.config.in_channels), s, s)

    @property
    def device(self) -> torch.device:
        """Where the UNet lives (all three networks live on one device after :meth:`to`)."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's parameter dtype."""
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> T2IModel:
        """Move the UNet, VAE and text encoder to ``device`` and/or cast them to ``dtype``, in place; returns self.

        The cache of encoded prompts is cleared (its tensors lived on the old device / dtype).
        """
        for m in (self.unet, self.vae, self.text_encoder):
            p = next(m.parameters())
            if (device is not None and p.device != torch.device(device)) or (dtype is not None and p.dtype != dtype):
                m.to(device=device, dtype=dtype)
        self._text_cache.clear()
        return self

    def eval(self) -> T2IModel:
        for m in (self.unet, self.vae, self.text_encoder):
            m.eval()
            m.requires_grad_(False)
        return self

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Save as a StableDiffusionPipeline folder that stock diffusers loads (written atomically).

        Each network is written in the dtype its weight files had when :func:`load_t2i` read them
        (``stored_dtypes``), whatever dtype it was loaded in, so the saved folder loads as its source does (a float32
        model edited in bfloat16 is not saved as a bfloat16 text encoder beside a float32 UNet, which stock
        ``from_pretrained`` cannot run; an fp16 checkpoint edited in float32 stays fp16). Loading in a narrower dtype
        than the files (``--dtype bfloat16`` for a float32 model) rounded every weight, which the saved model keeps:
        a UserWarning says so. A non-finite weight is refused before anything is written; an existing non-empty
        ``folder`` is replaced only with ``overwrite`` and only if diffshield wrote it (see
        :func:`diffshield.core.io.atomic_dir`).
        """

        from diffusers import StableDiffusionPipeline

        from diffshield.core.io import atomic_dir

        nets = weights_in_stored_dtype({"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder},
                                       self.stored_dtypes)
        pipe = StableDiffusionPipeline(
            vae=nets["vae"], text_encoder=nets["text_encoder"], tokenizer=self.tokenizer, unet=nets["unet"],
            scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            carry_other_components(self.source, tmp)
        return Path(folder)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weights_in_stored_dtype(nets: dict[str, torch.nn.Module],
                            stored: dict[str, torch.dtype | None]) -> dict[str, torch.nn.Module]:
    """The networks to save, each in the dtype its source's weight files had (``stored[name]``; None or absent: as it
    is): a CPU copy where that differs from the live dtype (the live module is left alone), else the module itself.

    Refused in one line, before anything is written: a non-finite weight, or one that overflows the dtype it is
    written in (a float32 weight above float16's 65504 after an edit of an fp16 checkpoint). A UserWarning says
    when a load in a narrower dtype than the files (float32 files loaded in bfloat16) rounded the weights that are
    saved."""
    import warnings

    from diffshield.core.checks import check_finite_modules
    from diffshield.core.device import module_dtype

    out, rounded = dict(nets), []
    for name, net in nets.items():
        want, now = stored.get(name), module_dtype(net)
        if want is None or want == now:
            continue
        if now.itemsize <= want.itemsize:  # float32 -> bfloat16, or float16 <-> bfloat16: the load rounded
            rounded.append(f"{name} ({_dtype_name(want)} files, loaded in {_dtype_name(now)})")
        out[name] = _copy_in_dtype(net, want)
    # what is written: the copies (a NaN or inf survives the cast; a cast can overflow) and the unchanged modules
    kept = {n: m for n, m in out.items() if m is nets[n]}
    if kept:
        check_finite_modules("the model", **kept)
    for name in out.keys() - kept.keys():
        check_finite_modules(f"the model in {_dtype_name(stored[name])} (the dtype of its source's weight files)",
                             **{name: out[name]})
    if rounded:
        warnings.warn(f"the saved model keeps the rounding of a load in a narrower dtype than its files: "
                      f"{', '.join(rounded)}; load in the files' dtype (--dtype float32) for an edit that leaves "
                      "the other weights exactly as they were", UserWarning, stacklevel=3)
    return out


def _copy_in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A CPU copy of a diffusers or transformers network with its floating-point weights in ``dtype``, for saving;
    the module itself (maybe on a GPU) is left as it is. Built empty from the module's config, then filled."""
    from accelerate import init_empty_weights

    cls = type(module)
    with init_empty_weights():
        copy = cls.from_config(module.config) if hasattr(cls, "from_config") else cls(module.config)
    state = {}
    for k, v in module.state_dict().items():
        v = v.detach().to("cpu")
        state[k] = v.to(dtype) if v.is_floating_point() else v.clone()
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.eval()


def carry_other_components(source: str | Path, folder: Path) -> list[str]:
    """Copy into a saved pipeline ``folder`` the components of the ``source`` folder that diffshield does not load
    (Stable Diffusion's ``safety_checker`` and ``feature_extractor``, ...) with their ``model_index.json`` entries and
    settings such as ``requires_safety_checker``, so that an edited model keeps them. Files are copied as they are,
    never loaded; weight files of one variant only (an fp16 download) get the plain names the saved networks have.
    Nothing happens for a toy model or a source without a model index. Returns the copied names."""
    src = Path(str(source)).expanduser()
    if not source or str(source).startswith("toy:") or not (src / "model_index.json").is_file():
        return []
    import shutil

    index = json.loads((src / "model_index.json").read_text())
    out_file = folder / "model_index.json"
    out = json.loads(out_file.read_text())
    copied = []
    for name, entry in index.items():
        if name.startswith("_") or name in T2I_COMPONENTS:
            continue
        if isinstance(entry, list):
            if len(entry) == 2 and entry[0] is not None and (src / name).is_dir():
                shutil.copytree(src / name, folder / name)
                _drop_variant_names(folder / name)
                out[name] = entry
                copied.append(name)
        else:  # a pipeline setting (requires_safety_checker)
            out[name] = entry
    if copied and "requires_safety_checker" not in index:
        out["requires_safety_checker"] = "safety_checker" in copied
    out_file.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return copied


def _drop_variant_names(folder: Path) -> None:
    """Give a copied component's weight files of one variant (``model.fp16.safetensors``, shards and their index)
    the plain names, which the saved pipeline's other components have: stock ``from_pretrained`` without
    ``variant`` finds no weights in a component holding variant files only. A folder with plain files is left."""
    variants = {file_variant(f.name) for f in folder.iterdir() if f.suffix in (".safetensors", *PICKLE_SUFFIXES)}
    if len(variants) != 1 or None in variants:  # plain files, or a choice to leave
        return
    (variant,) = variants
    tag = f".{variant}."
    for f in sorted(folder.iterdir()):
        if tag not in f.name:
            continue
        plain = f.with_name(f.name.replace(tag, ".", 1))
        if f.name.endswith(".json"):  # a shard index: its weight map names the shards
            index = json.loads(f.read_text())
            index["weight_map"] = {k: v.replace(tag, ".", 1) for k, v in index.get("weight_map", {}).items()}
            plain.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            f.unlink()
        else:
            f.rename(plain)


def _quiet_hf() -> None:
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()  # transformers' own "Loading weights" bar
    except Exception:  # pragma: no cover - logging helpers moved
        pass


def load_t2i(
    spec: str | Path,
    allow_pickle: bool = False,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> T2IModel:
    """Load a text-to-image model (StableDiffusionPipeline layout) as components, in eval mode without grads.

    Args:
        spec: a diffusers folder path, or ``"toy:t2i"`` for the shipped toy model.
        allow_pickle: accept pickled weight files when no safetensors exist (default False: refused).
        dtype: parameter dtype, a ``torch.dtype`` or a name (default float32; ``"auto"`` = float16 on CUDA, float32
            on the CPU; see :func:`diffshield.core.device.resolve_dtype`).
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"auto"``; an absent device is a one-line error
            raised before any weight is read.
    """
    from diffshield.core.device import resolve_device, resolve_dtype

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    _quiet_hf()
    path = resolve_model_path(spec)
    index = read_model_index(path)
    kind = index.get("_class_name", "?")
    missing = [c for c in T2I_COMPONENTS if not isinstance(index.get(c), list) or index[c][0] is None]
    if missing:
        what = KNOWN_KINDS.get(kind, f"a {kind} folder")
        raise DiffshieldError(
            f"'{path}' holds {what}, not a text-to-image model: it lacks {', '.join(missing)}; "
            "give a StableDiffusionPipeline-layout folder"
        )
    if kind in KNOWN_KINDS:
        raise DiffshieldError(f"'{path}' holds {KNOWN_KINDS[kind]}; a StableDiffusionPipeline-layout folder is needed")
    use_safe = {}
    for comp in ("unet", "vae", "text_encoder"):
        folder = path / comp
        if not folder.is_dir():
            raise DiffshieldError(f"'{path}' lists {comp} in model_index.json but has no '{comp}/' folder")
        use_safe[comp] = check_component_weights(folder, allow_pickle)
    variant = {comp: weight_variant(path / comp, safe) for comp, safe in use_safe.items()}  # e.g. fp16-only folders
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=use_safe["unet"],
                                                    variant=variant["unet"])
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=use_safe["vae"],
                                            variant=variant["vae"])
        text_encoder, info = CLIPTextModel.from_pretrained(
            path / "text_encoder", use_safetensors=use_safe["text_encoder"], variant=variant["text_encoder"],
            output_loading_info=True,
        )
        lost = list(info.get("missing_keys") or [])
        if lost:  # transformers only logs this (and diffshield quiets its logs): the encoder would stay random
            import transformers

            raise DiffshieldError(
                f"the text encoder in '{path / 'text_encoder'}' lacks {len(lost)} of its weights (e.g. {lost[0]}), "
                f"which would stay random; its files do not match this transformers ({transformers.__version__}): "
                "save it again with save_pretrained, or use the transformers version that wrote it")
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        sched_cls = getattr(diffusers, index["scheduler"][1], None)
        if sched_cls is None:
            raise DiffshieldError(f"unknown scheduler class {index['scheduler'][1]!r} in '{path}/model_index.json'")
        scheduler = sched_cls.from_pretrained(path, subfolder="scheduler")
    except DiffshieldError:
        raise
    except Exception as e:  # diffusers / transformers errors: keep the first line only
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffshieldError(f"could not load the model in '{path}': {msg}") from None
    stored = {comp: stored_dtype(path / comp, variant[comp]) for comp, safe in use_safe.items() if safe}
    model = T2IModel(unet, vae, text_encoder, tokenizer, scheduler, source=str(spec),
                     stored_dtypes={c: d for c, d in stored.items() if d is not None})
    return model.to(device, dtype).eval()

