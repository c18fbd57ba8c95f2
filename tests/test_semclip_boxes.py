"""Crop geometry, as properties: inside the image, non-empty, covering it, for any size."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_adapters.semclip.boxes import propose_boxes

sizes = st.integers(min_value=1, max_value=3000)
scales = st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3, unique=True)


@settings(max_examples=300, deadline=None)
@given(width=sizes, height=sizes, scales=scales, overlap=st.floats(0, 0.5), min_size=st.integers(1, 64))
def test_boxes_inside_nonempty_and_covering(width, height, scales, overlap, min_size):
    boxes = propose_boxes(width, height, scales=scales, overlap=overlap, min_size=min_size)
    assert boxes
    covered_x, covered_y = np.zeros(width, bool), np.zeros(height, bool)
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        covered_x[x0:x1] = True
        covered_y[y0:y1] = True
    # every kept scale is a full grid, so the union covers the image iff both axes are covered
    assert covered_x.all() and covered_y.all()

@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 400), height=st.integers(1, 400), scales=scales, overlap=st.floats(0, 0.5))
def test_every_pixel_is_covered(width, height, scales, overlap):
    covered = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in propose_boxes(width, height, scales=scales, overlap=overlap):
        covered[y0:y1, x0:x1] = True
    assert covered.all()


def test_extreme_aspect_ratios_and_tiny_images():
    assert propose_boxes(1, 1, scales=[(2, 2), (3, 3)], min_size=8) == [(0, 0, 1, 1)]
    wide = propose_boxes(4000, 3, scales=[(2, 2), (1, 4)], min_size=2)
    assert wide == [(0, 0, 1000, 3), (1000, 0, 2000, 3), (2000, 0, 3000, 3), (3000, 0, 4000, 3)]
    tall = propose_boxes(5, 3000, scales=[(3, 1)], overlap=0.2)
    assert [b[3] - b[1] for b in tall] == [1100, 1200, 1100]


def test_scale_count_and_overlap():
    boxes = propose_boxes(300, 200, scales=[(2, 2), (3, 3)], overlap=0.0)
    assert len(boxes) == 13
    grown = propose_boxes(300, 200, scales=[(2, 2)], overlap=0.5)
    assert grown[0] == (0, 0, 188, 125) and grown[3] == (112, 75, 300, 200)
