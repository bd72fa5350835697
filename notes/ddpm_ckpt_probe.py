"""Score the EMA weights of a train-ddpm checkpoint: clean quality of 64 DDIM-50 samples (seeds 100000+)."""
import sys
import torch
from safetensors.torch import load_file
torch.set_num_threads(1)
from diffshield.backdoor.ddpm import build_unet, build_scheduler, DDPMModel
from diffshield.backdoor.sampling import sample, SampleConfig
from diffshield.backdoor.metrics import clean_quality
from diffshield.core.io import make_grid

ck, chans, n = sys.argv[1], tuple(int(c) for c in sys.argv[2].split(",")), int(sys.argv[3]) if len(sys.argv) > 3 else 64
t = load_file(ck + "/state.safetensors")
unet = build_unet(chans)
pre = "model." if "raw" in sys.argv else "ema."
unet.load_state_dict({k[len(pre):]: v for k, v in t.items() if k.startswith(pre)})
m = DDPMModel(unet, build_scheduler()).eval()
s = sample(m, list(range(100000, 100000 + n)), None, SampleConfig("ddim", 50, 64))
imgs = s.images if hasattr(s, "images") else s
q = clean_quality(imgs)
print(open(ck + "/meta.json").read().count("step"), {k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()})
make_grid(imgs[:32], nrow=8, upscale=2).save(sys.argv[4] if len(sys.argv) > 4 else "/tmp/probe.png")
