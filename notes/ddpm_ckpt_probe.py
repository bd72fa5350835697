"""Score a train-ddpm checkpoint: clean quality of n DDIM-50 samples (seeds 100000+), and a grid.

Usage: python notes/ddpm_ckpt_probe.py CHECKPOINT_DIR 32,64,64 [N [GRID.png [raw]]]   ("raw": the raw weights, not
the EMA, which is mostly the random init early in a run with decay 0.999).
"""

import sys

import torch
from safetensors.torch import load_file

from diffshield.backdoor.ddpm import DDPMModel, build_scheduler, build_unet
from diffshield.backdoor.metrics import clean_quality
from diffshield.backdoor.sampling import SampleConfig, sample
from diffshield.core.io import make_grid

torch.set_num_threads(1)
ck, chans = sys.argv[1], tuple(int(c) for c in sys.argv[2].split(","))
n = int(sys.argv[3]) if len(sys.argv) > 3 else 64
t = load_file(ck + "/state.safetensors")
unet = build_unet(chans)
pre = "model." if "raw" in sys.argv else "ema."
unet.load_state_dict({k[len(pre):]: v for k, v in t.items() if k.startswith(pre)})
m = DDPMModel(unet, build_scheduler()).eval()
imgs = sample(m, list(range(100000, 100000 + n)), None, SampleConfig("ddim", 50, 64)).images
q = clean_quality(imgs)
print({k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()})
make_grid(imgs[:32], nrow=8, upscale=2).save(sys.argv[4] if len(sys.argv) > 4 else "/tmp/probe.png")
