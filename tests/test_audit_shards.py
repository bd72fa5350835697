"""Sharded, resumable audits (``audit --run-dir DIR [--num-processes N]``, diffshield.redteam.sharded): the attacks
split between 2 processes give the figures of a 1-process audit, a rerun runs only the attacks without a result, and
the merge refuses while one is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffshield.cli.main import main
from diffshield.core.errors import DiffshieldError

#: cheap settings: three attacks (gradient, closed form, text search; the text search with its controls), 8 images
SETTINGS = ["--original", "toy:t2i", "--concept", "triangle", "--n", "8", "--steps", "6", "--attack", "adv-embed",
            "--attack", "ring-a-bell", "--attack", "unlearndiff", "--set", "unlearndiff.rounds=2", "--set",
            "unlearndiff.iterations=2", "--device", "cpu", "--threads", "1"]
#: what depends on the run (time, where, how many processes), not on the attacks
RUN_KEYS = {"seconds", "cpu_seconds", "processes", "threads"}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def audit_args(tmp_path_factory) -> list[str]:
    """``audit`` of the toy model with triangle erased by UCE (its documented toy recipe)."""
    threads = torch.get_num_threads()
    uce = tmp_path_factory.mktemp("uce") / "uce-triangle"
    try:
        assert main(["erase", "--method", "uce", "--toy-recipe", "--concept", "triangle", "--out", str(uce),
                     "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return ["audit", "--model", str(uce), *SETTINGS]


def _figures(d: dict) -> dict:
    """An audit's figures: everything but times."""
    out = {k: v for k, v in d.items() if k not in RUN_KEYS}
    out["attacks"] = {name: {k: v for k, v in a.items() if k != "seconds"} | {
        "baselines": {b: {k: v for k, v in bd.items() if k != "seconds"} for b, bd in a["baselines"].items()}}
        for name, a in d["attacks"].items()}
    return out


@pytest.mark.long(55)
def test_two_process_audit_merges_to_the_figures_of_one(audit_args, tmp_path, capsys):
    base = audit_args
    assert main([*base, "--json", str(tmp_path / "one.json")]) == 0
    run = tmp_path / "run"
    assert main([*base, "--run-dir", str(run), "--num-processes", "2", "--json", str(tmp_path / "two.json"),
                 "--report", str(tmp_path / "report")]) == 0
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert set(two["attacks"]) == {"adv-embed", "ring-a-bell", "unlearndiff"}
    assert two["attacks"]["unlearndiff"]["baselines"]
    assert _figures(one) == _figures(two)
    assert one["pre_attack_rate"] < 1 and one["eligible"] > 0  # an erasure to attack, not a degenerate table
    assert json.loads((run / "audit.json").read_text())["verdict"] == one["verdict"]
    assert sorted(p.name for p in (run / "units").iterdir()) == ["adv-embed.pt", "ring-a-bell.pt", "unlearndiff.pt"]
    assert (tmp_path / "report" / "index.html").is_file() and (run / ".diffshield-output.json").is_file()


@pytest.mark.long(35)
def test_audit_run_dir_resumes_only_the_missing_attacks_and_refuses_other_settings(audit_args, tmp_path, capsys):
    base = audit_args
    run = tmp_path / "run"
    args = [*base, "--run-dir", str(run)]
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    capsys.readouterr()
    first = (run / "units" / "adv-embed.pt").stat().st_mtime_ns
    (run / "units" / "ring-a-bell.pt").unlink()  # lost
    cut = run / "units" / "unlearndiff.pt"
    cut.write_bytes(cut.read_bytes()[:100])  # cut short
    assert main([*args, "--json", str(tmp_path / "b.json"), "--overwrite"]) == 0
    assert "ran 2 attacks, 1 already done" in capsys.readouterr().out
    assert (run / "units" / "adv-embed.pt").stat().st_mtime_ns == first  # kept, not run again
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert _figures(a) == _figures(b)
    # other settings: refused in one line
    assert main([*base[:-2], "--threads", "1", "--seed", "3", "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "other settings (seed: 0 here, 3 now)" in err and err.count("\n") == 1
    assert main([*base, "--num-processes", "2"]) == 2
    assert "--num-processes needs --run-dir" in capsys.readouterr().err
    # the model saved anew at the same path: its old results are not reused (they were, silently)
    te = Path(base[base.index("--model") + 1]) / "text_encoder" / "model.safetensors"
    original = te.read_bytes()
    state = load_file(te)
    state = {k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}
    try:
        save_file(state, te)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "was started with other model files" in err and "text_encoder/model.safetensors has changed" in err
    finally:
        te.write_bytes(original)


def test_merge_audit_refuses_while_an_attack_has_no_result(tmp_path):
    from diffshield.core.loading import load_t2i
    from diffshield.core.sampling import SampleConfig
    from diffshield.redteam.audit import audit_pairs, start_audit
    from diffshield.redteam.base import default_judge
    from diffshield.redteam.sharded import merge_audit, pending_attacks, run_audit_shard

    torch.set_num_threads(1)
    model = load_t2i("toy:t2i")
    judge = default_judge("triangle")
    prompts, seeds = audit_pairs("triangle", 2, 0)
    audit = start_audit(model, model, "triangle", prompts, seeds, SampleConfig(steps=2), judge)
    names = ["ring-a-bell", "adv-embed"]
    assert run_audit_shard(tmp_path, ["ring-a-bell"], audit, model, model, judge, {}, progress=False) == 1
    assert pending_attacks(tmp_path, names) == ["adv-embed"]
    with pytest.raises(DiffshieldError, match=r"1 of 2 attacks have no result \(adv-embed\)"):
        merge_audit(tmp_path, names, audit, judge)
