"""PNGs that explain themselves: a colour scale, the question, small images enlarged, a note on a
flat map (`semclip show`, `tie show`); the effect plot's chance line, legend and target-in-crop rate."""

from __future__ import annotations

import torch
from PIL import Image, ImageColor
from typer.testing import CliRunner

from vlm_adapters import pictures
from vlm_adapters.adapters.semclip import Choice
from vlm_adapters.bench.plot import CHANCE, CONTROL, LEGEND, bars, row_text
from vlm_adapters.cli.main import app
from vlm_adapters.cli.semclip import explain_scores, render_scores
from vlm_adapters.cli.tie import render

BOXES = [(0, 0, 24, 18), (24, 0, 48, 18), (0, 18, 24, 36), (24, 18, 48, 36), (0, 0, 48, 36)]


def near(pixel, colour, tol: int = 24) -> bool:
    rgb = ImageColor.getrgb(colour) if isinstance(colour, str) else colour
    return all(abs(a - b) <= tol for a, b in zip(pixel, rgb))


def has_colour(image: Image.Image, colour, tol: int = 24) -> bool:
    return any(near(p, colour, tol) for _, p in image.convert("RGB").getcolors(1 << 24))


def test_colour_bar_runs_from_low_to_high_with_its_values():
    bar = pictures.colour_bar(200, 0.1, 0.9, "crop score")
    row = next(y for y in range(bar.height) if near(bar.getpixel((5, y)), pictures.LOW))
    assert near(bar.getpixel((bar.width - 6, row)), pictures.HIGH)
    assert near(bar.getpixel((bar.width // 2, row)), pictures.MID, tol=40)


def test_small_images_are_enlarged_by_a_whole_factor():
    small, factor = pictures.enlarge(Image.new("RGB", (48, 36)))
    assert factor == 8 and small.size == (384, 288)
    big = Image.new("RGB", (300, 400))
    assert pictures.enlarge(big) == (big, 1)


def test_semclip_picture_has_the_question_the_scale_and_a_note_when_flat():
    image = Image.new("RGB", (48, 36), "white")
    varied = Choice(BOXES, [0.1, 0.5, 0.2, 0.3, 0.25], [1])
    flat = Choice(BOXES, [0.2] * 5, [0])
    texts = explain_scores(varied, "What colour is the square?", enlarged=8)
    assert "What colour is the square?" in texts["title"] and "enlarged 8x" in texts["title"] and not texts["note"]
    assert "flat map" in explain_scores(flat, "Q?")["note"] and "untrained" in explain_scores(flat, "Q?")["note"]
    drawn, drawn_flat = render_scores(image, varied, question="Q?"), render_scores(image, flat, question="Q?")
    assert drawn.width == 48 * 8 and drawn.height > 36 * 8  # enlarged, with the question above and the scale below
    assert drawn_flat.height > drawn.height  # the note
    below = drawn.crop((0, drawn.height - 40, drawn.width, drawn.height))
    assert has_colour(below, pictures.LOW) and has_colour(below, pictures.HIGH)
    assert has_colour(drawn_flat, pictures.NOTE)


def test_tie_picture_shares_one_scale_and_notes_a_flat_map():
    image = Image.new("RGB", (40, 30), "white")
    torch.manual_seed(0)
    varied = render(image, {"mean": torch.rand(4, 4), "block 0": torch.rand(4, 4)}, "Where?")
    flat = render(image, {"mean": torch.zeros(4, 4), "block 0": torch.zeros(4, 4)}, "Where?", map="injection")
    assert varied.width == 2 * 256 and flat.height > varied.height
    assert has_colour(flat, pictures.NOTE) and not has_colour(varied, pictures.NOTE, tol=10)
    strip = varied.crop((0, varied.height - 40, varied.width, varied.height))
    assert has_colour(strip, pictures.LOW) and has_colour(strip, pictures.HIGH)


def test_tie_show_says_an_untrained_injection_map_is_flat(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "in.png")
    result = CliRunner().invoke(app, ["tie", "show", str(tmp_path / "in.png"), "--question", "Where?", "--family",
                                      "llava", "--map", "injection", "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 0, result.output
    assert "flat map: every gate is 0" in result.output
    with Image.open(tmp_path / "o.png") as png:
        assert has_colour(png.convert("RGB"), pictures.NOTE)


def test_effect_plot_marks_chance_controls_and_target_in_crop():
    summary = {"base": dict(accuracy_mean=0.27, accuracy_std=0.05),
               "semclip-oracle": dict(accuracy_mean=0.9, accuracy_std=0.02, target_in_crop=0.92),
               "tgfom-control": dict(accuracy_mean=0.3, accuracy_std=0.01)}
    with_chance, without = bars(summary, chance=0.25), bars(summary)
    assert has_colour(with_chance, CHANCE, tol=0) and not has_colour(without, CHANCE, tol=0)
    assert has_colour(without, CONTROL, tol=0)  # the control's bar, explained by the legend
    assert any("control" in text for _, text in LEGEND)
    assert row_text(summary["semclip-oracle"]) == "90.0%  (target in crop 92%)" and row_text(summary["base"]) == "27.0%"


def test_tie_show_says_an_untrained_attention_map_changes_nothing_yet(tmp_path):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "in.png")
    result = CliRunner().invoke(app, ["tie", "show", str(tmp_path / "in.png"), "--question", "Where?", "--family",
                                      "llava", "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 0, result.output
    assert "untrained TIE: every gate is 0" in result.output
    with Image.open(tmp_path / "o.png") as png:
        assert has_colour(png.convert("RGB"), pictures.NOTE)


def test_semclip_picture_says_the_scorer_is_untrained():
    from vlm_adapters.cli.semclip import untrained_note

    image = Image.new("RGB", (48, 36), "white")
    varied = Choice(BOXES, [0.1, 0.5, 0.2, 0.3, 0.25], [1])
    assert "random-init CLIP" in untrained_note("psi", None) and "zero-shot" in untrained_note("psi", "w.safetensors")
    assert untrained_note("attention", None) == "" and untrained_note("clip", "w.safetensors") == ""
    assert "random-init CLIP" in untrained_note("clip", None)
    texts = explain_scores(varied, "Q?", untrained=untrained_note("psi", None))
    assert texts["note"].startswith("untrained scorer")  # said although the map is not flat
    trained = render_scores(image, varied, question="Q?")
    fresh = render_scores(image, varied, question="Q?", untrained=untrained_note("psi", None))
    assert has_colour(fresh, pictures.NOTE) and not has_colour(trained, pictures.NOTE, tol=10)


def test_effect_legend_lists_only_the_rows_drawn_and_one_seed_has_no_spread():
    from vlm_adapters.bench.plot import BAR, ORACLE_NOTE, heading, legend_for

    semclip = {"base": dict(accuracy_mean=0.27, accuracy_std=0.0), "semclip-oracle": dict(accuracy_mean=0.9,
                                                                                         accuracy_std=0.0)}
    assert [c for c, _ in legend_for(semclip, 0.25)] == [BAR, CHANCE, None]
    assert legend_for(semclip, 0.25)[-1][1] == ORACLE_NOTE
    def grey(image):  # pixels of the control's exact grey (text antialiasing makes a few)
        return dict((c, n) for n, c in image.getcolors(1 << 24)).get(CONTROL, 0)

    with_control = {**semclip, "tie-control": dict(accuracy_mean=0.3, accuracy_std=0.0)}
    assert grey(bars(semclip, chance=0.25, seeds=1)) < 60 and grey(bars(with_control, chance=0.25)) > 1000
    assert heading(1, "100 held-out samples per seed") == "accuracy on held-out samples (1 seed), 100 held-out " \
        "samples per seed"
    assert "mean ± std over 3 seeds" in heading(3, "")


def test_equal_scorer_and_oracle_boxes_are_both_visible():
    from vlm_adapters.bench.plot import BOXES as KINDS
    from vlm_adapters.bench.plot import example

    canvas = Image.new("RGB", (100, 100), "black")
    tile = example(dict(image=canvas, question="Q?", answer="a", target=[40, 40, 50, 50], scorer=[10, 10, 60, 60],
                        oracle=[10, 10, 60, 60]))
    assert all(has_colour(tile, KINDS[k], tol=0) for k in ("target", "scorer", "oracle"))


def test_learning_curves_have_axes_and_a_control_that_shows_over_its_method():
    from vlm_adapters.bench.plot import BAR, curves

    curve = [[s, 2.0 - s / 100] for s in range(0, 101, 10)]
    panel = curves({"tie": dict(accuracy_mean=0.3, accuracy_std=0, curve=curve),
                    "tie-control": dict(accuracy_mean=0.3, accuracy_std=0, curve=curve)})  # the same curve
    assert has_colour(panel, BAR, tol=0) and has_colour(panel, CONTROL, tol=0)
    axis = panel.crop((0, 30, 40, panel.height - 40))  # left of the panel: the loss values
    assert has_colour(axis, (20, 20, 20), tol=60)


def test_printed_tables_say_what_their_rows_and_views_are():
    from vlm_adapters.bench.base_model import views_legend
    from vlm_adapters.bench.effect import table

    row = dict(accuracy_mean=0.5, accuracy_std=0.1, tokens=10, trainable=0, train_s=1.0, eval_s=1.0)
    text = table({"base": row, "semclip-oracle": row, "tgfom": row, "tgfom-control": row}, seeds=3)
    assert text.splitlines()[0].startswith("| method |") and "\nRows: one method each" in text
    assert "- semclip-oracle: the crop that makes the base most likely to give the reference answer: it chooses " \
           "with the answer" in text
    assert "- tgfom-control: tgfom with its text input a constant string" in text
    legend = views_legend(["overview", "alone"])
    assert "overview = the whole canvas" in legend and "alone = the canvas with the target alone" in legend
