"""The synthetic world: deterministic per seed, answers correct by construction, clear errors."""

import pytest
from PIL import ImageColor

from vlm_adapters.bench.evaluate import accuracy, normalise
from vlm_adapters.bench.world import MARKS, WorldConfig, answers, make_samples, mark_ink
from vlm_adapters.errors import AdapterError

CONFIG = WorldConfig(canvas_size=160, num_objects=5, marks=MARKS, num_samples=12)


def test_deterministic_per_seed():
    a, b = make_samples(CONFIG), make_samples(CONFIG)
    assert [s.id for s in a] == [s.id for s in b]
    assert all(x.image.tobytes() == y.image.tobytes() and x.question == y.question and x.answer == y.answer
               for x, y in zip(a, b))
    other = make_samples(CONFIG, seed=1)
    assert [s.image.tobytes() for s in other] != [s.image.tobytes() for s in a]
    assert make_samples(CONFIG, n=3)[2].image.tobytes() == a[2].image.tobytes()  # prefix-stable


def _read_mark(image, obj, config) -> str:
    """Re-derive an object's pattern from its pixels: the one pattern whose ink matches the object's
    central 6x6 pixels (mark colour where inked, the object's colour elsewhere)."""
    ink, paint = ImageColor.getrgb(config.mark_colour), ImageColor.getrgb(obj.colour)
    half = config.object_size // 2
    pixels = {(u, v): image.getpixel((obj.box[0] + u, obj.box[1] + v))
              for u in range(half - 3, half + 3) for v in range(half - 2, half + 4)}
    assert set(pixels.values()) == {ink, paint}
    fits = [m for m in MARKS if all((p == ink) == bool(mark_ink(m, u, v, config.mark_width))
                                    for (u, v), p in pixels.items())]
    assert len(fits) == 1
    return fits[0]


def test_answers_correct_by_construction():
    vocab = answers(CONFIG)
    for sample in make_samples(CONFIG, n=40):
        target = sample.objects[sample.target]
        assert sample.box == target.box and sample.answer in vocab
        matching = [o for o in sample.objects if f"{o.colour} {o.shape}?" in sample.question]
        assert matching == [target]  # the question singles out exactly one object
        for obj in sample.objects:  # the pixels show every recorded mark, the answer's included
            assert _read_mark(sample.image, obj, CONFIG) == obj.mark
        boxes = [o.box for o in sample.objects]
        assert all(0 <= b[0] < b[2] <= 160 and 0 <= b[1] < b[3] <= 160 for b in boxes)
        assert not any(a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
                       for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_marks_unique_per_canvas_no_leak():
    """With unique marks (the default) the answer names the target alone: no other object shares it."""
    for sample in make_samples(CONFIG, n=30):
        marks = [o.mark for o in sample.objects]
        assert len(set(marks)) == len(marks) and marks.count(sample.answer) == 1
    leaky = WorldConfig(canvas_size=160, num_objects=5, unique_marks=False)
    assert any(len({o.mark for o in s.objects}) < 5 for s in make_samples(leaky, n=10))
    with pytest.raises(AdapterError, match="unique marks"):
        WorldConfig(canvas_size=160, num_objects=5)  # 4 default marks for 5 objects


def test_stream_never_repeats():
    first, second = make_samples(CONFIG, n=4, start=0), make_samples(CONFIG, n=4, start=4)
    assert [s.id for s in make_samples(CONFIG, n=8)] == [s.id for s in first + second]


def test_knobs_and_errors():
    small = WorldConfig(canvas_size=96, num_objects=2, object_size=12, marks=("vertical", "checkered"), num_samples=3)
    samples = make_samples(small)
    assert len(samples) == 3 and samples[0].image.size == (96, 96) and set(answers(small)) == {"vertical", "checkered"}
    assert WorldConfig(seed=5).fingerprint() == WorldConfig(seed=6).fingerprint() != small.fingerprint()
    with pytest.raises(AdapterError, match="num_objects"):
        WorldConfig(num_objects=99)
    with pytest.raises(AdapterError, match="unknown colour"):
        WorldConfig(colours=("notacolour",))
    with pytest.raises(AdapterError, match="too small"):
        WorldConfig(canvas_size=40, num_objects=4)


def test_accuracy_and_normalise():
    samples = make_samples(CONFIG, n=2)
    assert normalise(" Vertical.\nmore") == "vertical"
    assert accuracy([samples[0].answer.upper(), "nothing"], samples) == 0.5
    with pytest.raises(AdapterError):
        accuracy(["x"], samples)


def test_grid_world_names_the_cell_and_keeps_old_fingerprints():
    """grid + refer="place": one object a cell, the question names the target's cell (and nothing
    about its looks); the pixels still show each recorded mark. Worlds without a grid hash as before."""
    grid = WorldConfig(canvas_size=48, object_size=14, margin=2, grid=2, refer="place")
    rows, columns = ("top", "bottom"), ("left", "right")
    for sample in make_samples(grid, n=30):
        cells = [o.cell for o in sample.objects]
        assert len(set(cells)) == len(cells) == 4
        for obj in sample.objects:
            (r, c), (x0, y0, x1, y1) = obj.cell, obj.box
            assert c * 24 <= x0 and x1 <= (c + 1) * 24 and r * 24 <= y0 and y1 <= (r + 1) * 24  # inside its cell
            assert _read_mark(sample.image, obj, grid) == obj.mark
        target = sample.objects[sample.target]
        assert sample.question == f"What pattern is on the object at the {rows[target.cell[0]]} {columns[target.cell[1]]}?"
    assert WorldConfig(grid=2).fingerprint() != WorldConfig().fingerprint()
    assert WorldConfig().fingerprint() == "7fa0bbf2466e7d78"  # the pre-grid hash: cached bases stay valid
    with pytest.raises(AdapterError, match="grid"):
        WorldConfig(refer="place")
    with pytest.raises(AdapterError, match="cannot hold"):
        WorldConfig(canvas_size=48, object_size=14, grid=2, num_objects=5, marks=MARKS)
    with pytest.raises(AdapterError, match="refer"):
        WorldConfig(grid=2, refer="colour")


def test_nine_marks_each_half_ink_and_distinct_so_variants_can_hold_more_objects():
    import numpy as np

    from vlm_adapters.bench.effect import EffectConfig, parse_marks
    from vlm_adapters.bench.world import MARKS, mark_ink

    assert len(MARKS) >= 8
    v, u = np.indices((16, 16))
    inks = {m: mark_ink(m, u, v, 2) for m in MARKS}
    assert all(abs(ink.mean() - 0.5) < 0.01 for ink in inks.values())  # shrunk, every mark blurs to one tint
    assert min((inks[a] != inks[b]).mean() for a in MARKS for b in MARKS if a != b) >= 0.25
    with pytest.raises(AdapterError, match="--marks 9"):
        WorldConfig(num_objects=6)
    config = EffectConfig.from_options(regime="detail", num_objects=6, marks="6")
    assert config.world.marks == MARKS[:6] and parse_marks("bricks, waves") == ("bricks", "waves")
    samples = make_samples(config.world, 8)
    assert all(len({o.mark for o in s.objects}) == 6 for s in samples)
    with pytest.raises(AdapterError, match="give 2 to 9"):
        parse_marks("12")
    assert WorldConfig().fingerprint() == WorldConfig(marks=MARKS[:4]).fingerprint()  # shipped bases stay valid
