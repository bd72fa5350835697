"""benchmarks/backdoor.py's ``parallel`` step (the zoo on a GPU session), with stand-in jobs: it keeps --jobs
processes running, copies each finished model's results, and stops at its budget."""

import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(monkeypatch, tmp_path, names, probes=()):
    spec = importlib.util.spec_from_file_location("backdoor_benchmark", ROOT / "benchmarks" / "backdoor.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(mod, "CACHE", tmp_path / "runs" / "results")
    monkeypatch.setattr(mod, "ZOO_MODELS", {n: {"kind": "clean"} for n in names})
    monkeypatch.setattr(mod, "PROBES", {n: {"kind": "clean"} for n in probes})
    (tmp_path / "runs" / "results").mkdir(parents=True)
    return mod


def test_parallel_runs_jobs_side_by_side_and_copies_what_finished(monkeypatch, tmp_path):
    mod = load_benchmark(monkeypatch, tmp_path, ["a", "b", "c", "done"])
    cache = tmp_path / "runs" / "results"
    (cache / "eval_done.json").write_text("{}")  # already evaluated: not rerun
    stamps = tmp_path / "stamps"
    stamps.mkdir()

    def fake(name, args):  # a job: note its start and end, write the model's eval and scan files
        code = (f"import time, pathlib; s = pathlib.Path({str(stamps)!r}); (s / '{name}.start').write_text("
                f"repr(time.time())); time.sleep(1.5); c = pathlib.Path({str(cache)!r}); "
                f"(c / 'eval_{name}.json').write_text('{{}}'); (c / 'scan_cpu_{name}.json').write_text('{{}}'); "
                f"(s / '{name}.end').write_text(repr(time.time()))")
        return [sys.executable, "-c", code]

    monkeypatch.setattr(mod, "job_command", fake)
    out = tmp_path / "out"
    assert mod.main(["parallel", "--jobs", "2", "--copy-to", str(out)]) == 0
    assert sorted(f.name for f in out.iterdir()) == ["eval_a.json", "eval_b.json", "eval_c.json", "scan_cpu_a.json",
                                                       "scan_cpu_b.json", "scan_cpu_c.json"]
    span = {n: (float((stamps / f"{n}.start").read_text()), float((stamps / f"{n}.end").read_text()))
            for n in "abc"}
    assert not (stamps / "done.start").exists()
    assert span["b"][0] < span["a"][1] and span["c"][0] >= min(span["a"][1], span["b"][1]) - 0.05  # 2 at a time
    assert (tmp_path / "runs" / "logs" / "parallel_a.log").exists()


def test_parallel_stops_at_its_budget(monkeypatch, tmp_path, capsys):
    mod = load_benchmark(monkeypatch, tmp_path, ["slow", "never"])
    monkeypatch.setattr(mod, "PARALLEL_GRACE_S", 0.5)
    monkeypatch.setattr(mod, "job_command", lambda name, args: [sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.time()
    assert mod.main(["parallel", "--jobs", "1", "--budget-s", "0.3"]) == 0
    assert time.time() - t0 < 10
    out = capsys.readouterr().out
    assert "slow: stopped at the budget" in out and "not started never" in out
    assert json.loads(out.strip().splitlines()[-1].split("; ", 1)[1]) == {"slow": "stopped at the budget",
                                                                           "never": "not started"}


def test_restore_fills_only_the_missing_evals_and_parallel_then_skips_them(monkeypatch, tmp_path, capsys):
    mod = load_benchmark(monkeypatch, tmp_path, ["a", "b", "c"])
    cache = tmp_path / "runs" / "results"
    (cache / "eval_a.json").write_text('{"name": "a", "mine": true}')  # a cached eval is never replaced
    published = tmp_path / "zoo.json"
    published.write_text(json.dumps({"models": [{"name": "a", "kind": "clean"}, {"name": "b", "kind": "clean"},
                                                {"name": "gone", "kind": "clean"}]}))
    assert mod.main(["restore", "--from", str(published)]) == 0
    assert json.loads((cache / "eval_a.json").read_text()) == {"name": "a", "mine": True}
    assert json.loads((cache / "eval_b.json").read_text())["restored_from"] == str(published)
    assert not (cache / "eval_gone.json").exists()  # not a zoo model
    started = []
    monkeypatch.setattr(mod, "job_command", lambda name, args: started.append(name) or [sys.executable, "-c", ""])
    assert mod.main(["parallel", "--jobs", "1"]) == 0
    assert started == ["c"]
    capsys.readouterr()
    try:
        mod.main(["restore", "--from", str(tmp_path / "missing.json")])
    except SystemExit as e:
        assert "no results file" in str(e)
    else:
        raise AssertionError("restore from a missing file must exit")


def test_parallel_takes_the_probes_after_the_zoo_and_eval_only_when_named(monkeypatch, tmp_path):
    mod = load_benchmark(monkeypatch, tmp_path, ["a", "b"], probes=["p"])
    started = []
    monkeypatch.setattr(mod, "job_command", lambda name, args: started.append(name) or [sys.executable, "-c", ""])
    assert mod.main(["parallel", "--jobs", "1"]) == 0
    assert started == ["a", "b", "p"]
    evaluated = []
    monkeypatch.setattr(mod, "eval_model", lambda name, spec, threads: evaluated.append(name) or {"name": name})
    assert mod.main(["eval"]) == 0 and evaluated == ["a", "b"]  # the zoo alone
    evaluated.clear()
    assert mod.main(["eval", "--only", "p"]) == 0 and evaluated == ["p"]
