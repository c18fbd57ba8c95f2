"""Candidate crops: a grid at each scale, with overlap, inside the image, covering it."""

from __future__ import annotations

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), pixels, half-open


def _cuts(length: int, parts: int, overlap: float) -> list[tuple[int, int]]:
    edges = [round(i * length / parts) for i in range(parts + 1)]
    pad = overlap * length / parts / 2
    return [(max(0, round(a - pad)), min(length, round(b + pad))) for a, b in zip(edges, edges[1:])]


def propose_boxes(width: int, height: int, *, scales, overlap: float = 0.0, min_size: int = 1) -> list[Box]:
    """Boxes of a rows x cols grid for each (rows, cols) in `scales`, each cell grown by `overlap`
    (a fraction of the cell) and clipped to the image. A scale whose cells would be narrower or
    shorter than `min_size` pixels is skipped; if every scale is, the one box is the whole image."""
    boxes: list[Box] = []
    for rows, cols in scales:
        if width / cols < min_size or height / rows < min_size:
            continue
        for y0, y1 in _cuts(height, rows, overlap):
            boxes.extend((x0, y0, x1, y1) for x0, x1 in _cuts(width, cols, overlap))
    return boxes or [(0, 0, width, height)]
