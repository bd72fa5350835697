"""The text-to-image Python API used from a notebook: misuse is refused in one line before any work, results are
JSON-able where documented, and seeds mean what the docs say."""

from __future__ import annotations

import copy
import json
import types

import numpy as np
import pytest
import torch

from diffshield.core.errors import DiffshieldError
from diffshield.core.sampling import SampleConfig, add_noise, denoise, encode_prompts, generate, initial_latents

FAST = SampleConfig(steps=1)


@pytest.mark.parametrize("seeds", [[-1], [1.5], [True], ["3"], [2**64], 3])
def test_generate_refuses_seeds_that_are_not_whole_numbers_in_range(tiny_model, seeds):
    # -1 drew the noise of 2**64 - 1 (torch reads seeds modulo 2**64), 1.5 was truncated to 1; both recorded as given
    with pytest.raises(DiffshieldError, match="seed"):
        generate(tiny_model, ["a red circle"], seeds=seeds, config=FAST, progress=False)
    with pytest.raises(DiffshieldError, match="seed"):
        initial_latents(tiny_model, seeds)


def test_generate_takes_numpy_and_tensor_seeds_as_ints(tiny_model):
    a = generate(tiny_model, ("a red circle", "a blue square"), seeds=[3, 4], config=FAST, progress=False)
    for seeds in (np.array([3, 4]), [np.int64(3), np.int64(4)], torch.tensor([3, 4])):
        b = generate(tiny_model, ["a red circle", "a blue square"], seeds=seeds, config=FAST, progress=False)
        assert torch.equal(a.images, b.images) and b.seeds == [3, 4] and all(type(s) is int for s in b.seeds)
    assert a.prompts == ["a red circle", "a blue square"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=["a red circle"], config={"steps": 1}), "SampleConfig"),
    (dict(prompts=["a red circle", None]), "strings"),
    (dict(prompts=["a red circle"], negative_prompt=["blue"]), "negative_prompt"),
    (dict(prompt_embeds=np.zeros((1, 77, 8), dtype=np.float32)), "prompt_embeds"),
    (dict(prompt_embeds=torch.zeros(1, 77, 5)), "prompt_embeds"),
    (dict(prompt_embeds=torch.zeros(77, 8)), "prompt_embeds"),
    (dict(prompt_embeds=torch.full((1, 77, 8), float("nan"))), "NaN or infinite"),
])
def test_generate_refuses_misuse_in_one_line(tiny_model, kwargs, match):
    with pytest.raises(DiffshieldError, match=match):
        generate(tiny_model, **{"config": FAST, "progress": False, **kwargs})


def test_a_model_name_is_refused_with_how_to_load_it(tiny_model):
    from diffshield.erase.uce import uce_erase

    for call in (lambda: generate("toy:t2i", ["a red circle"], config=FAST),
                 lambda: encode_prompts("toy:t2i", ["a red circle"]),
                 lambda: uce_erase("toy:t2i", ["circle"])):
        with pytest.raises(DiffshieldError, match="load_t2i"):
            call()


def test_encode_prompts_refuses_an_empty_list(tiny_model):
    with pytest.raises(DiffshieldError, match="at least one prompt"):
        encode_prompts(tiny_model, [])


@pytest.mark.parametrize("kwargs", [dict(steps=2.5), dict(steps=True), dict(batch_size=1.5),
                                    dict(batch_size=float("inf")), dict(guidance="5")])
def test_sample_config_refuses_non_numbers_and_fractions(kwargs):
    with pytest.raises(DiffshieldError):
        SampleConfig(**kwargs)


def test_sample_config_stores_numpy_numbers_as_plain_json_numbers():
    cfg = SampleConfig(steps=np.int64(2), guidance=np.float32(3.0), batch_size=np.int32(4))
    assert json.loads(json.dumps(vars(cfg))) == {"steps": 2, "guidance": 3.0, "batch_size": 4, "scheduler": "ddim"}


@pytest.mark.parametrize("t", [-1, 1000, 10.0])
def test_add_noise_refuses_timesteps_off_the_schedule(tiny_model, t):
    x = torch.zeros(1, *tiny_model.latent_shape)
    with pytest.raises(DiffshieldError, match="timesteps"):  # -1 read the schedule's last entry
        add_noise(tiny_model, x, x, t)


def test_denoise_refuses_mismatched_batches_and_zero_steps(tiny_model):
    lat = torch.zeros(2, *tiny_model.latent_shape)
    cond, uncond = encode_prompts(tiny_model, ["a", "b", "c"]), encode_prompts(tiny_model, [""])
    with pytest.raises(DiffshieldError, match="2 latents but 3"):
        denoise(tiny_model, lat, cond, uncond, steps=1)
    with pytest.raises(DiffshieldError, match="steps"):
        denoise(tiny_model, lat, cond[:2], uncond, steps=0)


def test_erase_refuses_another_methods_config_before_editing(tiny_model):
    from diffshield.erase.esd import ESDConfig
    from diffshield.erase.rece import RECEConfig, rece_erase
    from diffshield.erase.uce import UCEConfig, uce_erase

    model = copy.deepcopy(tiny_model)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    for call, name in ((lambda: uce_erase(model, ["circle"], RECEConfig()), "UCEConfig"),
                       (lambda: uce_erase(model, ["circle"], ESDConfig(iterations=1)), "UCEConfig"),
                       (lambda: uce_erase(model, ["circle"], "guides=square"), "UCEConfig"),
                       (lambda: rece_erase(model, ["circle"], UCEConfig()), "RECEConfig")):
        with pytest.raises(DiffshieldError, match=name):
            call()
    assert all(torch.equal(v, model.unet.state_dict()[k]) for k, v in before.items())


def test_closed_form_configs_take_numpy_numbers_as_floats_and_refuse_numpy_inf(tiny_model):
    from diffshield.erase.rece import RECEConfig
    from diffshield.erase.uce import UCEConfig, uce_erase

    with pytest.raises(DiffshieldError, match="finite"):  # passed, and wrote inf into the weights
        UCEConfig(erase_scale=np.float32("inf"))
    with pytest.raises(DiffshieldError, match="finite"):
        RECEConfig(lamb2=np.float32("inf"))
    with pytest.raises(DiffshieldError, match="number"):
        UCEConfig(lamb="0.5")
    cfg = RECEConfig(epochs=np.int64(1), lamb_r=np.float32(0.5))
    assert type(cfg.epochs) is int and type(cfg.lamb_r) is float
    result = uce_erase(copy.deepcopy(tiny_model), ["circle"], UCEConfig(guides=["square"], lamb=np.float32(0.5)))
    json.dumps(result.config)  # EraseResult.config is documented JSON-able (save_delta writes it)


def test_audit_prompt_pairs_take_one_string_as_one_prompt_and_refuse_bad_counts():
    from diffshield.redteam.audit import audit_pairs, audit_prompts, check_settings

    prompts, seeds = audit_pairs("triangle", 2, 0, prompts="a red triangle")
    assert prompts == ["a red triangle"] * 2 and seeds == [0, 1]  # was ['a', ' ']: the string's characters
    for call in (lambda: audit_prompts("triangle", 0), lambda: audit_prompts("triangle", 2, seed=1.5),
                 lambda: audit_pairs("triangle", 2, -1, prompts=["a"]), lambda: audit_pairs("t", 2.5, 0, ["a"])):
        with pytest.raises(DiffshieldError):
            call()
    with pytest.raises(DiffshieldError, match="dict of settings"):
        check_settings({"adv-embed": "lamb_r=0.1"}, 2, "toy")


def test_attack_call_refuses_float_seeds_and_a_sample_of_another_type(tiny_model):
    from diffshield.redteam import ATTACKS

    cls = ATTACKS.get("adv-embed")
    judge = lambda images: torch.zeros(len(images), dtype=torch.bool)  # noqa: E731
    atk = cls(tiny_model, original=tiny_model, judge=judge, sample=FAST)
    with pytest.raises(DiffshieldError, match="whole numbers"):
        atk(["a red circle"], seeds=[0.5])
    with pytest.raises(DiffshieldError, match="SampleConfig"):
        cls(tiny_model, original=tiny_model, judge=judge, sample="steps=1")


def test_evaluate_erasure_refuses_settings_it_cannot_finish_with_before_generating(tiny_model, monkeypatch):
    import diffshield.eval.erasure as erasure

    monkeypatch.setattr(erasure, "generate", lambda *a, **k: pytest.fail("generated before refusing"))
    detector = types.SimpleNamespace(predict=lambda images: None)
    for kwargs, match in ((dict(n_neutral=1), "n_neutral"), (dict(seeds_per_prompt=1.5), "seeds_per_prompt"),
                          (dict(seed=-1), "seed"), (dict(config={"steps": 1}), "SampleConfig")):
        with pytest.raises(DiffshieldError, match=match):
            erasure.evaluate_erasure(tiny_model, tiny_model, "red", detector, **kwargs)
    with pytest.raises(DiffshieldError, match="detector"):
        erasure.evaluate_erasure(tiny_model, tiny_model, "red", "toy:detector")


def test_count_exposed_refuses_a_nan_threshold():
    from diffshield.eval.nudity import count_exposed

    with pytest.raises(DiffshieldError, match="threshold"):  # counted no image as nude
        count_exposed([[{"class": "BELLY_EXPOSED", "score": 0.9}]], threshold=float("nan"))
