"""Evaluation helpers: I2P CSV prompts, NudeNet counting, toy concepts, the erasure report on tiny models."""

import json

import pytest
import torch
from PIL import Image

from diffshield.cli.main import main
from diffshield.core.errors import DiffshieldError
from diffshield.eval.nudity import EXPOSED_CLASSES, count_exposed, nudity_report
from diffshield.eval.prompts import load_prompt_csv
from diffshield.toyworld.concepts import concept_prompts, other_concepts, resolve_concept


def test_i2p_csv(tmp_path):
    f = tmp_path / "i2p.csv"
    f.write_text("prompt,evaluation_seed,evaluation_guidance,categories\n"
                 '"a red box, on a table",42,7.5,sexual\n'
                 "a star,,,\n")
    rows = load_prompt_csv(f)
    assert rows[0].prompt == "a red box, on a table" and rows[0].seed == 42 and rows[0].guidance == 7.5
    assert rows[0].meta == {"categories": "sexual"}
    assert rows[1].seed is None and rows[1].guidance is None
    excel = tmp_path / "excel.csv"  # saved by Excel as "CSV UTF-8": a byte-order mark and CRLF line ends
    excel.write_bytes(b"\xef\xbb\xbfprompt,evaluation_seed,evaluation_guidance\r\na red triangle,3,7\r\n")
    rows = load_prompt_csv(excel)
    assert [(r.prompt, r.seed, r.guidance) for r in rows] == [("a red triangle", 3, 7.0)]


def test_i2p_csv_errors(tmp_path):
    with pytest.raises(DiffshieldError, match="does not exist"):
        load_prompt_csv(tmp_path / "none.csv")
    f = tmp_path / "bad.csv"
    f.write_text("text,seed\nhello,1\n")
    with pytest.raises(DiffshieldError, match="no 'prompt' column"):
        load_prompt_csv(f)
    f.write_text("prompt,evaluation_seed\nhello,abc\n")
    with pytest.raises(DiffshieldError, match="line 2"):
        load_prompt_csv(f)
    f.write_text("prompt,evaluation_seed\nhello,1\nworld,1.9\n")  # read as seed 1 before
    with pytest.raises(DiffshieldError, match="line 3: the seed must be a whole number, got '1.9'"):
        load_prompt_csv(f)


def test_i2p_csv_seeds_as_spreadsheets_write_them_and_skipped_rows_said(tmp_path):
    f = tmp_path / "s.csv"
    f.write_text("prompt,evaluation_seed\na,42.0\nb,4.2e1\nc,9007199254740993\n,5\nd,\n")
    with pytest.warns(UserWarning, match=r"1 row with an empty prompt skipped \(line 5\)"):
        rows = load_prompt_csv(f)
    assert [(r.prompt, r.seed) for r in rows] == [("a", 42), ("b", 42), ("c", 9007199254740993), ("d", None)]


def test_count_exposed_uses_only_exposed_classes_above_threshold():
    dets = [
        [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.7}, {"class": "FEMALE_BREAST_EXPOSED", "score": 0.9}],
        [{"class": "FEMALE_BREAST_COVERED", "score": 0.99}, {"class": "FEET_EXPOSED", "score": 0.5}],
        [{"class": "FACE_FEMALE", "score": 0.9}],
        [{"class": "BUTTOCKS_EXPOSED", "score": 0.61}, {"class": "ARMPITS_EXPOSED", "score": 0.8}],
    ]
    r = count_exposed(dets, threshold=0.6)
    assert len(EXPOSED_CLASSES) == 9
    assert r["nude_images"] == 2 and r["nudity_rate"] == 0.5
    assert r["per_class"]["FEMALE_BREAST_EXPOSED"] == 1 and r["per_class"]["FEET_EXPOSED"] == 0
    assert count_exposed(dets, threshold=0.45)["per_class"]["FEET_EXPOSED"] == 1


def test_nudenet_runs_offline_on_a_folder(tmp_path):
    import nudenet  # noqa: F401  a dev dependency: its absence fails this test instead of skipping it
    for i in range(2):
        Image.new("RGB", (64, 64), (30 * i, 120, 200)).save(tmp_path / f"{i}.png")
    r = nudity_report(tmp_path)
    assert r["n_images"] == 2 and r["nudity_rate"] == 0.0
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DiffshieldError, match="not a readable image"):
        nudity_report(tmp_path)


def test_toy_concepts():
    c = resolve_concept("wedge")
    assert (c.head, c.name, c.synonyms) == ("shape", "triangle", ("wedge",))
    assert [p for p, _ in concept_prompts(c)][0] == "a red triangle"
    assert {o.name for o in other_concepts(c)} == {"circle", "square", "star"}
    assert resolve_concept("striped").head == "style" and len(concept_prompts(resolve_concept("striped"))) == 16
    with pytest.raises(DiffshieldError, match="not a toy-world concept"):
        resolve_concept("zebra")


def test_generate_with_i2p_csv_uses_row_seeds(tiny_sd_dir, tmp_path):
    f = tmp_path / "p.csv"
    f.write_text("prompt,evaluation_seed,evaluation_guidance\na red box,11,7.5\na star,3,2\n")
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_sd_dir), "--prompts-csv", str(f), "--n", "2", "--steps", "2",
                 "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert [(r["prompt"], r["seed"]) for r in m["images"]] == [("a red box", 11), ("a red box", 12),
                                                               ("a star", 3), ("a star", 4)]
    assert m["guidance_per_image"] == [7.5, 7.5, 2.0, 2.0]


@pytest.mark.parametrize("command", [["generate"], ["erase", "--method", "uce", "--concept", "red"]])
def test_threads_option_sets_torch_threads_and_rejects_negatives(tiny_sd_dir, tmp_path, capsys, command):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        args = [*command, "--model", str(tiny_sd_dir), "--out", str(tmp_path / "o")]
        if command == ["generate"]:
            args += ["--prompt", "a red box", "--n", "1", "--steps", "2"]
        assert main([*args, "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert main([*args, "--threads", "-1"]) == 2  # a usage error: one line, status 2
        assert "must be 0 or more" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def test_erasure_report_of_a_model_against_itself(tiny_model):
    from diffshield.core.sampling import SampleConfig
    from diffshield.eval.erasure import evaluate_erasure

    class Fixed(torch.nn.Module):  # a stand-in detector that always sees a red triangle
        def predict(self, images):
            n = len(images)
            z = torch.zeros(n, dtype=torch.long)
            return {"shape": (z + 2, z.float() + 1), "colour": (z, z.float() + 1), "style": (z, z.float() + 1)}

        def features(self, images):
            return images.flatten(1)[:, :8]

    r = evaluate_erasure(tiny_model, tiny_model, "triangle", Fixed(), seeds_per_prompt=1, n_neutral=4,
                         config=SampleConfig(steps=2))
    assert r["erased_detection_rate"] == r["original_detection_rate"] == 1.0
    assert r["synonym_detection_rate"] == 1.0 and r["other_accuracy"] == 0.0
    # what the detector saw instead: every other shape's prompts drawn as triangles
    assert r["other_seen"] == r["original_other_seen"]
    assert r["other_seen"]["circle"] == {"circle": 0.0, "square": 0.0, "triangle": 1.0, "star": 0.0}
    assert r["concept_seen"]["triangle"] == 1.0
    assert r["frechet_neutral"] == pytest.approx(0.0, abs=1e-6)


def test_erasure_report_counts_its_images_in_a_progress_bar(tiny_model, capsys):
    from diffshield.core.sampling import SampleConfig
    from diffshield.eval.erasure import evaluate_erasure
    from diffshield.toyworld.concepts import concept_prompts, other_concepts, resolve_concept

    class Fixed(torch.nn.Module):
        def predict(self, images):
            z = torch.zeros(len(images), dtype=torch.long)
            return {"shape": (z, z.float() + 1), "colour": (z, z.float() + 1), "style": (z, z.float() + 1)}

        def features(self, images):
            return images.flatten(1)[:, :8]

    evaluate_erasure(tiny_model, tiny_model, "triangle", Fixed(), seeds_per_prompt=1, n_neutral=4,
                     config=SampleConfig(steps=1), progress=True)
    c = resolve_concept("triangle")
    total = sum(len(concept_prompts(x)) for x in [c, *other_concepts(c)]) + 4
    total += sum(len(concept_prompts(c, w)) for w in c.synonyms)
    err = capsys.readouterr().err
    for label in ("original", "erased"):  # one bar per model, sized to the images it generates
        assert f"{label}:   0%|          | 0/{total} " in err


def test_i2p_csv_row_with_more_fields_than_the_header_is_one_line(tmp_path):
    """An unquoted comma in a prompt gave an AttributeError traceback (csv puts extra fields under the key None)."""
    f = tmp_path / "c.csv"
    f.write_text("prompt,evaluation_seed,evaluation_guidance\n\na red triangle,1,5\na red, striped triangle,3,5\n")
    with pytest.raises(DiffshieldError, match=r"line 4: 4 fields but the header has 3; quote a prompt"):
        load_prompt_csv(f)


def test_a_nudity_folder_names_what_it_does_not_score(tmp_path):
    """A GIF, a TIFF or a subfolder of images was left out of the nudity rate without a word."""
    from PIL import Image

    from diffshield.eval.nudity import list_images

    for name in ("a.png", "grid.png", "b.gif", "c.tif"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "more").mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"3 entries not scored .*: b.gif, c.tif, more/$"):
        assert [p.name for p in list_images(tmp_path)] == ["a.png"]


def test_eval_erasure_batch_size_reaches_the_sampler(tiny_sd_dir, monkeypatch, capsys):
    """``eval erasure --batch-size`` was only used with --prompts; the plain evaluation sampled 64 a batch."""
    import diffshield.eval.erasure as erasure
    from diffshield.cli.main import main

    seen = []

    def fake(erased, original, concept, detector, config=None, **kw):
        seen.append(config.batch_size)
        raise KeyboardInterrupt  # stop before any image: only the plumbing is under test

    monkeypatch.setattr(erasure, "evaluate_erasure", fake)
    assert main(["eval", "erasure", "--model", str(tiny_sd_dir), "--original", str(tiny_sd_dir), "--concept",
                 "triangle", "--batch-size", "7"]) != 0
    assert seen == [7]
