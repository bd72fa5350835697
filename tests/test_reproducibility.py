"""The same command twice gives the same files, byte for byte."""

from __future__ import annotations

import torch
from safetensors import safe_open
from safetensors.torch import save

from diffshield.cli.main import main


def test_safetensors_with_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """The safetensors library writes metadata in a randomly seeded hash order: ten saves of the same tensors and
    metadata gave ten different files. In canonical form they are one, and read back the same."""
    from diffshield.core.io import canonical_safetensors

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.float16)}
    meta = {k: f"value of {k}" for k in ("method", "format", "version", "base_model", "config", "é", "z")}
    raw = [save(tensors, metadata=meta) for _ in range(10)]
    assert len({canonical_safetensors(b) for b in raw}) == 1
    path = tmp_path / "x.safetensors"
    path.write_bytes(canonical_safetensors(raw[0]))
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta
        assert sorted(f.keys()) == ["a", "b"]
        assert all(torch.equal(f.get_tensor(k), tensors[k]) for k in tensors)
    assert canonical_safetensors(canonical_safetensors(raw[0])) == canonical_safetensors(raw[0])


def test_erasing_twice_writes_byte_identical_folders(tmp_path, capsys):
    """'erase' run twice with the same settings writes the same model and the same delta.safetensors, byte for byte
    (the delta's metadata order differed from run to run)."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(["erase", "--method", "uce", "--concept", "triangle", "--out", str(out), "--threads", "1",
                     "--device", "cpu"]) == 0
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert "delta.safetensors" in {str(f) for f in files}
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*") if p.is_file())
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
