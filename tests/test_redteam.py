"""Red-team attacks: each brings an erased concept back (toy world), results are deterministic, the audit and its
CLI work end to end. Cheap settings (few denoising and optimisation steps) keep the file well under a minute."""

from __future__ import annotations

import json

import pytest
import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.sampling import SampleConfig, generate
from diffshield.redteam import ATTACKS
from diffshield.redteam.audit import AUDIT_ATTACKS, audit_prompts, format_table, run_audit, write_report
from diffshield.redteam.base import SoftPromptEncoder, ToyConceptJudge, word_token_ids

FAST = SampleConfig(steps=8, guidance=5.0)
#: cheap settings per attack for the tests
CHEAP = {
    "adv-embed": {},
    "ring-a-bell": {},
    "ring-a-bell-genetic": {"population": 8, "generations": 3},
    "unlearndiff": {"steps": 6, "n_targets": 1},
    "p4d": {"steps": 6, "n_targets": 1},
}
#: attacks that must raise the detection rate of an erased concept (the genetic search may not: see docs/redteam.md)
#: continuous Ring-A-Bell does not break the documented toy UCE edit of triangle on world version 2 (benchmark: 12 %
#: of 32 images; 0 of 8 here), so it is not required to raise detection against it
RAISING = ("adv-embed", "unlearndiff", "p4d")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread: on a shared, oversubscribed CPU, extra OpenMP threads spin and slow everything down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy(one_thread):
    import copy

    from diffshield.core.loading import load_t2i
    from diffshield.erase.uce import uce_erase
    from diffshield.toyworld.detector import load_detector
    from diffshield.toyworld.erasure_recipes import toy_erasure

    original = load_t2i("toy:t2i")
    erased = copy.deepcopy(original)
    # the documented toy setting (templates, guides, preserved values), as the benchmark and the demo use: bare words
    # with the default config erase the triangle from only some of the toy model's images
    uce_erase(erased, *toy_erasure("uce", "triangle"))
    detector = load_detector("toy:detector")
    prompts, seeds = audit_prompts("triangle", 8)
    judge = ToyConceptJudge("triangle", detector)
    pre = judge(generate(erased, prompts, seeds, config=FAST, progress=False).images).float().mean().item()
    return {"original": original, "erased": erased, "detector": detector, "prompts": prompts, "seeds": seeds,
            "pre": pre, "judge": judge}


def test_registry_lists_every_attack():
    assert set(AUDIT_ATTACKS) <= set(ATTACKS.names())
    with pytest.raises(DiffshieldError, match="unknown attack"):
        ATTACKS.get("nope")


def test_audit_prompts_cycle_over_concept_prompts():
    prompts, seeds = audit_prompts("triangle", 8, seed=3)
    assert len(set(prompts)) == 4 and sorted(set(seeds)) == [3, 4]
    assert all("triangle" in p for p in prompts)


@pytest.mark.parametrize("name", RAISING)
def test_attack_raises_detection_against_uce(toy, name):
    atk = ATTACKS.get(name)(toy["erased"], original=toy["original"], concept="triangle", judge=toy["judge"],
                            sample=FAST, **CHEAP[name])
    out = atk(toy["prompts"], toy["seeds"])
    assert out.images.shape == (8, 3, 32, 32) and out.success.dtype == torch.bool
    assert out.seeds == toy["seeds"] and out.prompts == toy["prompts"]
    assert out.embeddings is not None and out.embeddings.shape[:2] == (8, 77)
    assert toy["pre"] <= 0.5
    assert out.asr >= toy["pre"] + 0.25, f"{name}: ASR {out.asr:.2f} vs {toy['pre']:.2f} without attack"
    json.dumps(out.to_dict())


@pytest.mark.parametrize("name", ["ring-a-bell-genetic", "unlearndiff"])
def test_attack_is_deterministic(toy, name):
    def run():
        atk = ATTACKS.get(name)(toy["erased"], original=toy["original"], concept="triangle", judge=toy["judge"],
                                sample=FAST, **CHEAP[name])
        return atk(toy["prompts"][:1], toy["seeds"][:1])

    a, b = run(), run()
    assert torch.equal(a.success, b.success)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert a.attack_prompts == b.attack_prompts


def test_genetic_search_keeps_concept_words_out(toy):
    atk = ATTACKS.get("ring-a-bell-genetic")(toy["erased"], concept="triangle", judge=toy["judge"], sample=FAST,
                                             **CHEAP["ring-a-bell-genetic"])
    out = atk(toy["prompts"][:1], toy["seeds"][:1])
    assert out.attack_prompts and all("triangle" not in p and "wedge" not in p for p in out.attack_prompts)
    assert len(out.attack_prompts[0].split()) == 8


def test_unlearndiff_keeps_excluded_words_out_of_its_discrete_prefix(toy):
    """exclude_words: the words named (here the other shapes') never appear in the projected prefix, as the
    concept's own words never do."""
    rivals = ["circle", "disc", "square", "box", "star"]
    atk = ATTACKS.get("unlearndiff")(toy["erased"], original=toy["original"], concept="triangle", judge=toy["judge"],
                                     sample=FAST, steps=2, n_targets=1, discrete=True, exclude_words=rivals)
    out = atk(toy["prompts"], toy["seeds"])  # 4 distinct prompts: 20 prefix words
    prefixes = [p[: -len(q)].split() for p, q in zip(out.attack_prompts, toy["prompts"])]
    assert all(len(w) == 5 for w in prefixes)
    assert not {w for ws in prefixes for w in ws} & set(rivals + ["triangle", "wedge"])
    with pytest.raises(DiffshieldError, match="exclude_words"):
        ATTACKS.get("unlearndiff")(toy["erased"], original=toy["original"], concept="triangle", exclude_words=[3])


def test_configs_are_validated(toy):
    with pytest.raises(DiffshieldError, match="lamb_r"):
        ATTACKS.get("adv-embed")(toy["erased"], original=toy["original"], concept="triangle", lamb_r=-1)
    with pytest.raises(DiffshieldError, match="white-box"):
        ATTACKS.get("unlearndiff")(toy["erased"], concept="triangle")
    with pytest.raises(DiffshieldError, match="search"):
        ATTACKS.get("ring-a-bell")(toy["erased"], concept="triangle", search="beam")
    with pytest.raises(DiffshieldError, match="bad setting"):
        ATTACKS.get("p4d")(toy["erased"], original=toy["original"], concept="triangle", nope=1)
    with pytest.raises(DiffshieldError, match="judge"):
        ATTACKS.get("ring-a-bell")(toy["erased"], concept="nudity")


def test_soft_prompt_encoder_is_differentiable_on_tiny_model(tiny_model):
    enc = SoftPromptEncoder(tiny_model, 3)
    d_in = tiny_model.text_encoder.get_input_embeddings().weight.shape[1]
    soft = torch.zeros(2, 3, d_in, requires_grad=True)
    out = enc.encode(soft, ["a red triangle", "a blue box"])
    out.sum().backward()
    assert out.shape[:2] == (2, 77) and soft.grad is not None and soft.grad.abs().sum() > 0
    ids = word_token_ids(tiny_model, exclude=["triangle", "wedge"])
    words = tiny_model.tokenizer.convert_ids_to_tokens(ids.tolist())
    assert "triangle</w>" not in words and "red</w>" in words


def test_tiny_model_runs_every_attack(tiny_model):
    always = lambda images: torch.ones(len(images), dtype=torch.bool)  # noqa: E731
    audit = run_audit(tiny_model, tiny_model, "triangle", attacks="all", n=2,
                      sample=SampleConfig(steps=2), judge=always, prompts=["a red triangle"],
                      hp={k: v for k, v in CHEAP.items()} | {"unlearndiff": {"steps": 2, "n_targets": 1,
                                                                              "batch_timesteps": 1},
                                                               "p4d": {"steps": 2, "n_targets": 1}},
                      progress=False)
    assert set(audit.results) == set(AUDIT_ATTACKS)
    assert all(r.images.shape == (2, 3, 16, 16) for r in audit.results.values())


def test_audit_report(toy, tmp_path):
    audit = run_audit(toy["erased"], toy["original"], "triangle", attacks=["adv-embed"], n=8,
                      sample=FAST, detector=toy["detector"], progress=False)
    d = audit.to_dict()
    assert set(d["attacks"]) == {"adv-embed"}
    for a in d["attacks"].values():
        assert set(a) >= {"asr", "pre_attack_rate", "n"} and a["n"] == 8
    assert d["pre_attack_rate"] == pytest.approx(toy["pre"])
    assert "erased + adv-embed" in format_table(audit)
    write_report(audit, tmp_path / "report")
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"index.html", "audit.json", "adv-embed.png",
                                                                  "no_attack.png", "original.png"}


def test_audit_cli(tiny_sd_dir, tmp_path, capsys):
    from diffshield.cli.main import main

    model = ["--model", str(tiny_sd_dir), "--original", str(tiny_sd_dir)]
    threads = torch.get_num_threads()
    try:
        rc = main(["audit", *model, "--concept", "triangle", "--attack", "adv-embed", "--n", "2", "--steps", "2",
                   "--json", str(tmp_path / "a.json"), "--report", str(tmp_path / "rep")])
        assert torch.get_num_threads() == 1  # the default: one thread (robust when other jobs share the cores)
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    res = json.loads((tmp_path / "a.json").read_text())
    assert set(res["attacks"]) == {"adv-embed"} and res["attacks"]["adv-embed"]["n"] == 2 and res["threads"] == 1
    assert main(["audit", *model, "--concept", "triangle", "--threads", "-1"]) == 2
    assert "must be 0 or more" in capsys.readouterr().err
    assert (tmp_path / "rep" / "index.html").exists()
    assert main(["audit", *model, "--concept", "hexagon", "--n", "2"]) == 2
    assert "not a toy-world concept" in capsys.readouterr().err
    assert main(["audit", *model, "--concept", "triangle", "--set", "bad"]) == 2
    assert "ATTACK.FIELD=VALUE" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_step(tmp_path):
    from diffshield.cli.redteam import demo_step

    summary = demo_step(tmp_path)
    json.dumps(summary)
    assert summary["attacks"]["adv-embed"]["asr"] > summary["pre_attack_rate"]
    assert (tmp_path / "audit" / "index.html").exists()
