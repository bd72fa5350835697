# ruff: noqa  (scratch probe used for notes/issue6.md section (d); run from the repo root)
"""Quick vulnerability probe of a toy-inpainter checkpoint (or 'toy'): AaD success / fill distance on 16 held-out
scenes (paper settings, uint8 output), first-order reach, held-out fill PSNR (object removal / boxes)."""
import json, sys, time
sys.path.insert(0, "benchmarks")
import numpy as np, torch
torch.set_num_threads(1)
from diffshield.protect.inpainters import FFCConfig, FFCInpainterNet, ToyInpainter, load_inpainter
from diffshield.protect.attack_as_defense import AttackAsDefenseConfig, protect
from diffshield.protect.metrics import evaluate_protection
from diffshield.protect.scenes import make_scenes, protected_masks, benign_masks, training_masks
from diffshield.protect.train_inpainter import fill_psnr
from protect import sensitivity

src = sys.argv[1]; size = int(sys.argv[2]) if len(sys.argv) > 2 else 64; n = int(sys.argv[3]) if len(sys.argv) > 3 else 16
if src == "toy":
    f = load_inpainter("toy"); step = "shipped"
else:
    st = torch.load(f"{src}/checkpoint.pt", map_location="cpu", weights_only=True)
    cfg = json.load(open(f"{src}/netcfg.json"))
    net = FFCInpainterNet(FFCConfig(**cfg)); net.load_state_dict(st["net"]); net.eval()
    f = ToyInpainter(net).eval(); step = st["step"]
    for p in f.parameters(): p.requires_grad_(False)
t0 = time.time()
s = make_scenes(n, size, seed=10_000); m = protected_masks(s.object_masks, max(1, size // 32))
r = protect(f, s.images, m, AttackAsDefenseConfig())
ev = evaluate_protection(f, s.images, r.protected, m, seed=3, partial=False)
sens = sensitivity(f, s.images, m)
held = make_scenes(100, size, seed=1000)
pm = protected_masks(held.object_masks, max(1, size // 32))
q = dict(obj=fill_psnr(f, held.images, pm, held.without_object), box=fill_psnr(f, held.images, benign_masks(pm)))
out = dict(src=src, step=step, size=size, success_M=ev["success_rate"], success_Me=ev["success_rate_expanded"],
           dist_M=[round(ev["distance_to_target_M_unprotected"], 3), round(ev["distance_to_target_M"], 3)],
           dist_Me=[round(ev["distance_to_target_M_e_unprotected"], 3), round(ev["distance_to_target_M_e"], 3)],
           loss=[round(r.losses[0], 4), round(r.losses[-1], 4)], psnr_prot=round(ev["psnr_protected"], 2),
           psnr_benign=round(ev["psnr_benign"], 2),
           reach_med={k[-1]: round(v["median"], 2) for k, v in sens.items()},
           reach_max={k[-1]: round(v["max"], 2) for k, v in sens.items()},
           fill_psnr_obj=round(q["obj"], 2), fill_psnr_box=round(q["box"], 2), secs=round(time.time() - t0, 1))
print(json.dumps(out), flush=True)
with open("runs/protect2/probes.jsonl", "a") as fh: fh.write(json.dumps(out) + "\n")
