"""Export a train-ddpm checkpoint (raw or EMA weights) as a DDPMPipeline folder, for trials on a half-trained base."""
import sys

from safetensors.torch import load_file

from diffshield.backdoor.ddpm import DDPMModel, build_scheduler, build_unet

ck, chans, out, which = sys.argv[1], tuple(int(c) for c in sys.argv[2].split(",")), sys.argv[3], sys.argv[4]
t = load_file(ck + "/state.safetensors")
pre = "model." if which == "raw" else "ema."
unet = build_unet(chans)
unet.load_state_dict({k[len(pre):]: v for k, v in t.items() if k.startswith(pre)})
DDPMModel(unet, build_scheduler()).eval().save(out, info={"made_by": f"notes/ddpm_ckpt_export.py {ck} {which}"})
print("wrote", out)
