"""Interrupted commands: Ctrl-C, SIGTERM and SIGKILL leave no half-written output, and a rerun cleans up after them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from diffshield.core import io
from diffshield.core.errors import DiffshieldError

# A command stopped in the middle of writing its output folder: ``toyworld dataset`` whose work is replaced by a
# slow write into the temporary folder, so that a signal surely lands while it is there.
_SLOW_COMMAND = textwrap.dedent("""
    import signal, sys, time
    from diffshield.cli import main as m
    from diffshield.core.io import atomic_dir

    def slow(args):
        with atomic_dir(args.out, overwrite=args.overwrite, command="toyworld dataset") as tmp:
            (tmp / "grid.png").write_bytes(b"half")
            print("writing", flush=True)
            time.sleep(60)
        return 0

    m.cmd_toyworld_dataset = slow
    m.only_launches = lambda args: True  # skips importing diffusers' logging: seconds, and not needed here
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also where the tests run detached
    sys.exit(m.main(["toyworld", "dataset", "--out", sys.argv[1]]))
""")

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


def _start_slow(out: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _SLOW_COMMAND, str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing", p.stderr.read()
    return p


@posix_only
@pytest.mark.parametrize(("sig", "status", "line"), [(signal.SIGINT, 130, "diffshield: interrupted"),
                                                     (signal.SIGTERM, 143, "diffshield: terminated")])
def test_a_signal_mid_write_exits_with_one_line_and_leaves_nothing(tmp_path, sig, status, line):
    """Ctrl-C exits 130 and SIGTERM (a job scheduler's stop) 143, each with one line and no traceback, promptly;
    neither leaves the output or its temporary folder (Python's default SIGTERM killed the process on the spot and
    left '.out.xxxxxxxx.tmp' with the half-written files)."""
    out = tmp_path / "out"
    p = _start_slow(out)
    t0 = time.time()
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert time.time() - t0 < 10
    assert p.returncode == status
    assert err.strip().splitlines() == [line]
    assert list(tmp_path.iterdir()) == []


@posix_only
def test_a_rerun_removes_what_a_killed_process_left_and_keeps_what_a_live_one_writes(tmp_path):
    """SIGKILL cannot be caught: the temporary folder stays. The next write of the same output removes it (without
    --overwrite, and the output is written), while the temporary folder of a process still writing is kept, as is
    anything else with a similar name."""
    out = tmp_path / "out"
    killed = _start_slow(out)
    killed.kill()
    killed.communicate(timeout=30)
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(".out.") and left.name.endswith(".tmp") and (left / "grid.png").is_file()

    live = _start_slow(out)
    try:
        live_tmp = {p for p in tmp_path.iterdir()} - {left}
        assert len(live_tmp) == 1
        (tmp_path / ".out.my-notes.tmp").write_text("mine")  # not a name diffshield makes
        with io.atomic_dir(out, command="toyworld dataset") as tmp:
            (tmp / "grid.png").write_bytes(b"whole")
        assert not left.exists()
        assert live_tmp.pop().is_dir()
        assert (tmp_path / ".out.my-notes.tmp").read_text() == "mine"
        assert (out / "grid.png").read_bytes() == b"whole"
    finally:
        live.kill()
        live.communicate(timeout=30)


def test_result_files_remove_temporary_files_of_killed_writes(tmp_path):
    """A --json or --grid write killed before its rename leaves '.NAME.xxxxxxxx.tmp'; the next write of that result
    removes it, while a temporary file another process is writing (it holds its lock) stays."""
    fcntl = pytest.importorskip("fcntl")
    stale = tmp_path / ".r.json.ab12cd34.tmp"
    stale.write_text('{"half')
    busy = tmp_path / ".r.json.zz99yy88.tmp"
    busy.write_text('{"being written')
    with open(busy, "rb") as f:  # another open file description: a lock as another process holds it
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        io.write_result_json(tmp_path / "r.json", {"a": 1})
        assert busy.exists()
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.json.zz99yy88.tmp", "r.json"]


def test_two_processes_finishing_the_same_output_at_once_one_wins_whole(tmp_path, monkeypatch):
    """Two identical commands writing the same --out: both check it before moving their result into place. The
    check and the move are one step under a lock, so the second sees the first's output and refuses (without
    --overwrite) rather than replacing a result the first already reported as written."""
    fcntl = pytest.importorskip("fcntl")  # noqa: F841 - the lock needs it
    out = tmp_path / "out"

    def slowed(check):
        def slow_check(*a, **k):  # widen the window between the final check and the move
            t = check(*a, **k)
            time.sleep(0.3)
            return t
        return slow_check

    for name in ("check_output_dir", "_check_output_dir"):  # the public check, and the one the final check uses
        if hasattr(io, name):
            monkeypatch.setattr(io, name, slowed(getattr(io, name)))
    barrier = threading.Barrier(2)
    results: dict[str, object] = {}

    def write(name: str) -> None:
        try:
            with io.atomic_dir(out, command="generate") as tmp:
                (tmp / "who.txt").write_text(name)
                barrier.wait()
            results[name] = "wrote"
        except DiffshieldError as e:
            results[name] = str(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [n for n, r in results.items() if r == "wrote"]
    assert len(winners) == 1, results
    (loser,) = set(results) - set(winners)
    assert "pass --overwrite" in results[loser]
    assert (out / "who.txt").read_text() == winners[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_SLOW_TRAINING = textwrap.dedent("""
    import sys, time
    from diffshield.core.io import output_in_place

    with output_in_place(sys.argv[1], "backdoor implant", overwrite=True) as out:
        print("writing", flush=True)  # a training run: the previous output is set aside meanwhile
        time.sleep(60)
""")


@posix_only
def test_a_killed_training_run_gives_back_the_previous_output_it_set_aside(tmp_path):
    """'backdoor implant --overwrite' sets the previous model aside ('.OUT.xxxxxxxx.old') while it trains. Killed
    (SIGKILL), it left the previous model hidden there and --out missing; the next run puts it back first, so a rerun
    without --overwrite says, before any work, how to replace it, and one with --overwrite leaves no hidden folder
    behind."""
    out = tmp_path / "bd"
    with io.output_in_place(out, "backdoor implant") as t:
        t.mkdir()  # the training function writes the folder itself
        (t / "model.safetensors").write_bytes(b"previous")
    p = subprocess.Popen([sys.executable, "-c", _SLOW_TRAINING, str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing", p.stderr.read()
    p.kill()
    p.communicate(timeout=30)
    assert not out.exists() and [x.name.endswith(".old") for x in tmp_path.iterdir()] == [True]

    with pytest.raises(DiffshieldError, match="pass --overwrite"):  # the check every command makes before any work
        io.check_output_dir(out, "backdoor implant")
    assert (out / "model.safetensors").read_bytes() == b"previous"
    with io.output_in_place(out, "backdoor implant", overwrite=True) as t:
        t.mkdir()
        (t / "model.safetensors").write_bytes(b"new")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bd"]
    assert (out / "model.safetensors").read_bytes() == b"new"


def test_a_prompts_run_stopped_while_it_hashes_the_models_can_be_rerun(tmp_path, monkeypatch, capsys):
    """A --prompts run hashes the models' files before its first image (seconds for an SD-sized model). Stopped
    then, it had already written run.json but not its marker, and the rerun refused the folder as one diffshield
    did not write; now nothing is written before the hashing, and the rerun simply runs."""
    from diffshield.cli.main import main
    from diffshield.core import shards

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red triangle\n")
    out = tmp_path / "run"
    argv = ["generate", "--prompts", str(prompts), "--n", "1", "--steps", "2", "--out", str(out), "--threads", "1",
            "--device", "cpu"]

    def stopped(models):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(shards, "model_files_record", stopped)
        assert main(argv) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("diffshield: interrupted; rerun the same command to "
                                                                "resume it")
    assert main(argv) == 0, capsys.readouterr().err
    assert (out / "manifest.json").is_file() and (out / "models.json").is_file()


def test_an_output_written_inside_another_being_written_does_not_wait_for_itself(tmp_path):
    """The demo writes each step's output folder inside its own temporary folder; finishing the inner one takes the
    lock of its parent, the outer temporary folder, which this very process holds: it must not wait for itself."""
    done = threading.Event()

    def nested() -> None:
        with io.atomic_dir(tmp_path / "demo", command="demo") as outer:
            with io.atomic_dir(outer / "generate", command="generate") as inner:
                (inner / "grid.png").write_bytes(b"png")
        done.set()

    t = threading.Thread(target=nested, daemon=True)
    t.start()
    t.join(timeout=20)
    assert done.is_set(), "writing a nested output waited for a lock its own process holds"
    assert (tmp_path / "demo" / "generate" / "grid.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_main_called_from_python_gives_sigterm_back_its_default_handling(tmp_path):
    """The command line turns SIGTERM into a clean stop while a command runs; a program (or notebook) that calls
    ``main`` keeps its own SIGTERM handling afterwards, and one it set itself is never replaced."""
    import signal

    from diffshield.cli.main import main

    def mine(signum, frame):  # noqa: ARG001 - a program's own handler
        pass

    # a library used earlier in this process (torch's launcher) may have left its own handler: start from the default
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert main(["toyworld", "dataset", "--n", "2", "--out", str(tmp_path / "a")]) == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        signal.signal(signal.SIGTERM, mine)
        assert main(["toyworld", "dataset", "--n", "2", "--out", str(tmp_path / "b")]) == 0
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
