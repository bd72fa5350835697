"""benchmarks/gpu.py at tiny shapes on the CPU: every row's code path runs, and diffshield's sampler draws the very
images stock ``StableDiffusionPipeline.__call__`` draws from the same per-seed generators."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.long(70)
def test_gpu_benchmark_tiny_on_cpu(tmp_path):
    bench = load_benchmark()
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = bench.main(["--device", "cpu", "--tiny", "--sections",
                         "generate,sharded,closed_form,esd,redteam,terd,protect", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    rec = json.loads(out.read_text())
    assert rc == 0 and rec["errors"] == {}
    assert rec["environment"]["device"] == "cpu" and rec["environment"]["diffusers"]
    s = rec["sections"]
    for row in s["generate"]["rows"]:
        assert row["image_max_abs_diff"] < 1e-4  # same model, seeds and scheduler: the same images as stock
        assert row["diffshield_images_per_s"] > 0 and row["stock_images_per_s"] > 0
    assert s["sharded"]["images"] == 16 and s["sharded"]["ratio"] > 0
    assert {r["method"] for r in s["esd"]["rows"]} == {"esd-x", "esd-u"}
    assert all(r["expected_1000_iterations_s"] > 0 for r in s["esd"]["rows"])
    assert set(s["redteam"]["rows"]) == {"adv-embed", "ring-a-bell", "ring-a-bell-genetic", "unlearndiff", "p4d"}
    assert s["closed_form"]["uce"]["median_s"] > 0 and s["terd"]["ran"]
    assert set(s["protect"]["rows"]) == {"paper", "eot"}


def test_compare_reports_differences():
    bench = load_benchmark()
    gpu = {"sections": {"cli": {"scan": {"figures": {"mean_kl": 0.2, "backdoored": True}}}}}
    cpu = {"sections": {"cli": {"scan": {"figures": {"mean_kl": 0.25, "backdoored": True}}}}}
    got = bench.compare(gpu, cpu)["scan"]
    assert abs(got["mean_kl"]["abs_diff"] - 0.05) < 1e-9 and got["mean_kl"]["cpu"] == 0.25
