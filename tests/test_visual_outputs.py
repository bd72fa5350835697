"""What a user looks at: grids name their rows and columns, small images are upscaled enough to see, the audit
report's images exist, have alt text and need no network, the protection panel is labelled. No model is run."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from diffshield.core.io import make_grid
from diffshield.core.sampling import SampleConfig
from diffshield.redteam.audit import Audit, write_report
from diffshield.redteam.base import AttackResult


def _dark_pixels(img, box) -> int:
    arr = np.asarray(img.crop(box).convert("L"))
    return int((arr < 100).sum())


def test_make_grid_draws_row_and_column_labels_around_the_unchanged_tiles():
    imgs = torch.rand(6, 3, 16, 16)
    plain = make_grid(imgs, nrow=3, upscale=2, pad=1)
    labelled = make_grid(imgs, nrow=3, upscale=2, pad=1, row_labels=["original", "erased"],
                         col_labels=["seed 0", "seed 1", "seed 2"], title="before / after")
    left, top = labelled.width - plain.width, labelled.height - plain.height
    assert left > 20 and top > 20  # a margin for the row labels and for the title and column labels
    # the tiles are pasted as they were, below and right of the labels
    assert np.array_equal(np.asarray(labelled.crop((left, top, labelled.width, labelled.height))), np.asarray(plain))
    assert _dark_pixels(labelled, (0, top, left, labelled.height)) > 20  # row labels are drawn
    assert _dark_pixels(labelled, (left, 0, labelled.width, top)) > 20  # column labels and title are drawn


def test_display_upscale_shows_toy_images_at_96_px_or_more():
    from diffshield.core.io import display_upscale

    assert display_upscale(32) == 3 and display_upscale(16) == 6 and display_upscale(512) == 1
    assert 32 * display_upscale(32) >= 96


def _toy_audit(size: int = 16) -> Audit:
    g = torch.Generator().manual_seed(0)
    prompts, seeds = ["a red triangle", "a red triangle", "a blue <wedge>", "a blue <wedge>"], [0, 1, 0, 1]
    imgs = lambda: torch.rand(4, 3, size, size, generator=g)  # noqa: E731
    yes, no = torch.tensor([True, True, True, False]), torch.tensor([False, False, False, False])
    res = AttackResult("adv-embed", imgs(), torch.tensor([True, False, True, True]), seeds, prompts,
                       access="weights")
    return Audit(concept="triangle", prompts=prompts, seeds=seeds, sample=SampleConfig(steps=2),
                 pre_attack_images=imgs(), pre_attack_success=no, original_images=imgs(), original_success=yes,
                 results={"adv-embed": res}, scores={"no attack": [0.1, 0.2, 0.0, 0.3]})


def test_audit_report_images_exist_have_alt_text_and_need_no_network(tmp_path):
    write_report(_toy_audit(), tmp_path / "rep")
    page = (tmp_path / "rep" / "index.html").read_text()
    imgs = re.findall(r"<img [^>]*>", page)
    assert len(imgs) == 3 * 4 * 2  # original, no attack, adv-embed: once side by side, once in their own table
    for tag in imgs:
        src = re.search(r"src='([^']+)'", tag).group(1)
        assert (tmp_path / "rep" / src).is_file(), src
        alt = re.search(r"alt='([^']*)'", tag).group(1)
        assert "seed" in alt and "prompt" in alt and "detected" in alt
    assert "alt='erased model, no attack; prompt &#x27;a blue &lt;wedge&gt;&#x27;, seed 1: concept not detected" \
        " (p=0.30)'" in page  # escaped, and names the set, the prompt, the seed, the judgement and the score
    # one folder, offline: no external address, script, stylesheet, font or CSS background image
    assert not re.search(r"(?:https?:)?//", page.replace("<!doctype html>", ""))
    assert "<script" not in page and "<link" not in page and "url(" not in page and "@import" not in page
    for ref in re.findall(r"(?:src|href)='([^'#]+)'", page):
        assert (tmp_path / "rep" / ref).exists(), ref


def test_audit_report_puts_attack_success_next_to_the_reference_rates_and_side_by_side(tmp_path):
    write_report(_toy_audit(), tmp_path / "rep")
    page = (tmp_path / "rep" / "index.html").read_text()
    summary = page[page.index("<table class='plain'>"):page.index("</table>")]
    assert "original model" in summary and "erased, no attack" in summary and "adv-embed" in summary
    assert "detected 3/4 = 75%" in summary and "detected 0/4 = 0%" in summary
    side = page[page.index("id='side-by-side'"):]
    side = side[:side.index("</table>")]
    for head in ("original model (before erasure)", "erased model, no attack", "under attack: adv-embed"):
        assert f"<th>{head}</th>" in side
    assert side.count("<tr>") == 1 + 4  # a header, then one row per (prompt, seed)
    assert "&#10007; not detected" in page and "sampling: steps 2" in page and "{&#x27;" not in page


@pytest.mark.parametrize("size", [16, 32, 100])
def test_audit_report_tiles_match_the_strip_pngs_at_any_image_size(tmp_path, size):
    from PIL import Image

    write_report(_toy_audit(size), tmp_path / "rep")
    page = (tmp_path / "rep" / "index.html").read_text()
    strip = Image.open(tmp_path / "rep" / "no_attack.png")
    frame = max(1, round(size / 16))
    tile = strip.width // 4
    assert strip.width == 4 * tile and strip.height == tile  # one row of 4 square framed tiles
    assert tile >= 96 and tile % (size + 2 * frame) == 0  # upscaled (nearest, integer) to be seen
    m = re.search(r"<div class='tile' style='width:(\d+)px;height:(\d+)px'><img src='no_attack.png' "
                  r"width='(\d+)' height='(\d+)'", page)
    shown = int(m.group(1))
    assert int(m.group(2)) == shown and int(m.group(3)) == 4 * shown and int(m.group(4)) == shown
    assert shown == tile  # shown at the stored size: the crop offsets i * shown land on tile i
    assert f"margin-left:-{3 * shown}px" in page


def test_audit_strip_frames_surround_the_images_without_covering_them(tmp_path):
    from diffshield.redteam.audit import _framed

    images = torch.rand(3, 3, 32, 32)
    framed = _framed(images, torch.tensor([True, False, True]))
    assert framed.shape == (3, 3, 36, 36)
    assert torch.equal(framed[:, :, 2:-2, 2:-2], images)
    assert framed[0, 1, 0, 0] > 0.5 and framed[1, 0, 0, 0] > 0.5  # green frame (detected), red frame (not)


def test_protection_panel_names_rows_and_columns_and_shows_the_perturbation():
    from diffshield.cli.protect import PANEL_COLUMNS, labelled_panel

    g = torch.Generator().manual_seed(0)
    n, h = 2, 24
    x = torch.rand(n, 3, h, h, generator=g)
    xp = (x + 0.02 * torch.randn(n, 3, h, h, generator=g)).clamp(0, 1)
    mask = torch.zeros(n, 1, h, h)
    mask[:, :, 8:16, 8:16] = 1
    fill = lambda: (torch.rand(n, 3, h, h, generator=g), torch.rand(n, 3, h, h, generator=g))  # noqa: E731
    images = {"original": x, "protected": xp, "mask": mask, "benign_mask": torch.zeros(n, 1, h, h), "M": fill(),
              "M_e": fill(), "benign": fill()}
    up = 3
    img = labelled_panel(images, slice(0, 2), upscale=up)
    cell = h * up + 2
    assert img.width >= 5 * cell + 2 + 40  # five columns (the perturbation one added) and a label margin
    assert img.height >= 2 * (2 * cell + 2) + 40  # two scenes of two rows, column labels and title
    assert len(PANEL_COLUMNS) == 5 and "perturbation" in PANEL_COLUMNS[-1]
    left = img.width - (5 * cell + 2)
    assert _dark_pixels(img, (0, 0, left, img.height)) > 40  # row labels
    # the perturbation column of a protected row is amplified: far from flat grey
    arr = np.asarray(img.convert("RGB")).astype(float)
    col = arr[:, img.width - cell + 4: img.width - 4]
    assert col.std() > 30


def test_a_generate_grid_has_one_labelled_row_per_prompt():
    """Two prompts x 5 images were tiled 8 a row (the first row mixed both prompts) with no labels."""
    from diffshield.cli.main import prompt_rows

    assert prompt_rows(["a"] * 5 + ["b"] * 5) == {"nrow": 5, "row_labels": ["a", "b"]}
    assert prompt_rows(["a"] * 3 + ["b"] * 2) == {"nrow": 8}  # uneven: plain rows of 8
    assert prompt_rows(["a"] * 40) == {"nrow": 8}  # too long for a row
    assert prompt_rows([None] * 4) == {"nrow": 8}  # embeddings, no prompt
