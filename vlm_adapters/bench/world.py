"""A synthetic fine-detail VQA world: a large canvas of small objects, each with a fine pattern.

Every object has a shape and a colour (visible even when the canvas is shrunk to a VLM's input size)
and its mark, a fine stripe pattern over the object (horizontal, vertical, checkered or diagonal,
each half ink): shrunk to the VLM's input size the stripes blur into the same tint, while a crop
around the object shows them. A question singles out one object by its colour and shape, which no
other object on the canvas shares, and asks for its pattern: "What pattern is on the red circle?"
-> "vertical". The answer vocabulary is closed (`answers(config)`); answers are correct by construction.
With `unique_marks` (the default) no two objects on a canvas share a pattern, so the answer is
determined by the named object alone: a crop that holds another object cannot leak the answer.
With `grid` g > 0 the objects sit in distinct cells of a g x g grid (g <= 3), and with
`refer="place"` the question names the object by its cell instead: "What pattern is on the object
at the top left?" (the position follows from the question; the object's looks do not).

    config = WorldConfig(canvas_size=128, num_objects=4, seed=0)
    samples = make_samples(config)          # deterministic per seed
    samples[0].image, samples[0].question, samples[0].answer, samples[0].box
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from ..errors import AdapterError

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), pixels, half-open

VERSION = 4  # bump when drawing changes: cached base models trained on the old pictures are then stale
SHAPES = ("circle", "square", "triangle", "diamond")
# half ink each: shrunk to the VLM's input size, every one blurs to the same tint. The first four are the default
# world's; the rest let variants hold more objects with unique marks (`--marks`)
MARKS = ("horizontal", "vertical", "checkered", "diagonal", "antidiagonal", "bricks", "tiles", "zigzag", "waves")
REFER = ("name", "place")  # how a question singles out its object: colour and shape, or grid cell
ROWS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
COLUMNS = {2: ("left", "right"), 3: ("left", "centre", "right")}


@dataclass
class WorldConfig:
    """Every knob of the world. `object_size` is an object's side in pixels; `marks` the patterns
    (a subset of MARKS), drawn in `mark_colour` with stripes `mark_width` pixels wide (diagonal
    ones 1.5x); `margin` the least gap between two objects. Colours are PIL colour names. Each
    object's (colour, shape) is unique on its canvas, so num_objects must be at most
    len(colours) * len(shapes); with `unique_marks` each object's pattern is unique too (no answer
    leakage), so num_objects must also be at most len(marks)."""

    canvas_size: int = 128
    num_objects: int = 4
    object_size: int = 16
    mark_width: int = 2
    margin: int = 4
    shapes: tuple = SHAPES
    colours: tuple = ("red", "green", "blue", "orange", "purple")
    marks: tuple = MARKS[:4]
    mark_colour: str = "white"
    background: str = "black"
    num_samples: int = 256
    seed: int = 0
    unique_marks: bool = True
    grid: int = 0  # 0: objects anywhere; g: in distinct cells of a g x g grid (2 or 3)
    refer: str = "name"  # "name": "the red circle"; "place" (needs a grid): "the object at the top left"

    def __post_init__(self) -> None:
        self.shapes, self.colours, self.marks = tuple(self.shapes), tuple(self.colours), tuple(self.marks)
        bad = [s for s in self.shapes if s not in SHAPES] + [m for m in self.marks if m not in MARKS]
        if bad:
            raise AdapterError(f"unknown shapes/marks {bad}: shapes are {SHAPES}, marks are {MARKS}")
        for name in (*self.colours, self.mark_colour, self.background):
            try:
                ImageColor.getrgb(name)
            except ValueError:
                raise AdapterError(f"unknown colour {name!r}: use a PIL colour name such as 'red'") from None
        if len(set(self.marks)) < 2 or len(set(self.shapes)) < 1 or len(set(self.colours)) < 1:
            raise AdapterError("the world needs at least 2 distinct marks, 1 shape and 1 colour")
        if not 1 <= self.num_objects <= len(self.shapes) * len(self.colours):
            raise AdapterError(f"num_objects={self.num_objects}: each object's (colour, shape) is unique, so "
                               f"it must be in [1, {len(self.shapes) * len(self.colours)}]")
        if self.unique_marks and self.num_objects > len(set(self.marks)):
            raise AdapterError(f"num_objects={self.num_objects} with unique marks needs as many distinct marks, got "
                               f"{len(set(self.marks))}: add marks (`--marks {len(MARKS)}`, or names from "
                               f"{', '.join(MARKS)}), lower num_objects, or set unique_marks=False (then another object "
                               "may share the answer and leak it)")
        if self.object_size < 8 or self.mark_width < 1 or self.margin < 0 or self.num_samples < 0:
            raise AdapterError("object_size must be >= 8, mark_width >= 1, margin >= 0, num_samples >= 0")
        if self.refer not in REFER:
            raise AdapterError(f"refer={self.refer!r}: choose one of {REFER}")
        if self.grid:
            if self.grid not in ROWS:
                raise AdapterError(f"grid={self.grid}: use 0 (objects anywhere), 2 or 3 (cells of a g x g grid)")
            if self.num_objects > self.grid ** 2 or self.canvas_size // self.grid < self.object_size + self.margin:
                raise AdapterError(f"a {self.grid}x{self.grid} grid on a {self.canvas_size}px canvas cannot hold "
                                   f"{self.num_objects} objects of {self.object_size}px (+{self.margin}px margin) "
                                   "one a cell: enlarge canvas_size or lower num_objects/object_size")
        elif self.refer == "place":
            raise AdapterError('refer="place" names an object by its grid cell: set grid to 2 or 3')
        cells = (self.canvas_size // (self.object_size + self.margin)) ** 2
        if not self.grid and cells < 2 * self.num_objects:
            raise AdapterError(f"a {self.canvas_size}px canvas is too small for {self.num_objects} objects of "
                               f"{self.object_size}px: enlarge canvas_size or lower num_objects/object_size")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def fingerprint(self) -> str:
        """A hash of every knob that changes the images, questions or answers (not the sample count)."""
        keys = {k: v for k, v in self.to_dict().items() if k not in ("num_samples", "seed")} | {"version": VERSION}
        if not self.grid and self.refer == "name":  # worlds made before grids keep their fingerprint (and cached bases)
            del keys["grid"], keys["refer"]
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class WorldObject:
    shape: str
    colour: str
    mark: str
    box: Box
    cell: tuple[int, int] | None = None  # (row, column) in the grid, when the world has one


@dataclass
class Sample:
    id: str
    image: Image.Image
    question: str
    answer: str
    box: Box  # the target object's box
    objects: list[WorldObject] = field(default_factory=list)
    target: int = 0  # index of the target in `objects`


def answers(config: WorldConfig) -> list[str]:
    """The closed answer vocabulary."""
    return list(dict.fromkeys(config.marks))


def place(cell: tuple[int, int], grid: int) -> str:
    """A grid cell in words: "top left", "middle centre", ..."""
    return f"{ROWS[grid][cell[0]]} {COLUMNS[grid][cell[1]]}"


def question_for(obj: WorldObject, config: WorldConfig | None = None) -> str:
    if config is not None and config.refer == "place":
        return f"What pattern is on the object at the {place(obj.cell, config.grid)}?"
    return f"What pattern is on the {obj.colour} {obj.shape}?"


def corpus(config: WorldConfig) -> str:
    """Every question with every answer, one a line: text to fit a tokenizer's merges to the world."""
    cells = [(r, c) for r in range(config.grid) for c in range(config.grid)] or [None]
    questions = dict.fromkeys(question_for(WorldObject(s, c, "", (0, 0, 1, 1), cell), config)
                              for c in config.colours for s in config.shapes for cell in cells)
    return "".join(f"{q} {m}\n" for q in questions for m in answers(config))


def make_samples(config: WorldConfig, n: int | None = None, seed: int | None = None, start: int = 0) -> list[Sample]:
    """`n` samples (default config.num_samples) of the world seeded by `seed` (default config.seed),
    numbered from `start`. Sample i depends only on (seed, i): the first k samples of a longer list
    are the same, and consecutive `start`s stream fresh samples that never repeat."""
    n = config.num_samples if n is None else n
    seed = config.seed if seed is None else seed
    return [_sample(config, seed, i) for i in range(start, start + n)]


def _sample(config: WorldConfig, seed: int, index: int) -> Sample:
    rng = random.Random(f"vlm-adapters-world:{seed}:{index}")
    kinds = rng.sample([(c, s) for c in config.colours for s in config.shapes], config.num_objects)
    boxes, cells = _in_cells(config, rng) if config.grid else (_place(config, rng), [None] * config.num_objects)
    marks = (rng.sample(list(dict.fromkeys(config.marks)), config.num_objects) if config.unique_marks
             else [rng.choice(config.marks) for _ in kinds])
    objects = [WorldObject(s, c, m, box, cell) for (c, s), m, box, cell in zip(kinds, marks, boxes, cells)]
    target = rng.randrange(len(objects))
    obj = objects[target]
    return Sample(f"{seed}-{index}", render(config, objects), question_for(obj, config), obj.mark, obj.box,
                  objects, target)


def _in_cells(config: WorldConfig, rng: random.Random) -> tuple[list[Box], list[tuple[int, int]]]:
    """Objects in distinct random cells of the grid, each at a random place inside its cell."""
    g, cell = config.grid, config.canvas_size // config.grid
    cells = rng.sample([(r, c) for r in range(g) for c in range(g)], config.num_objects)
    slack = cell - config.object_size - config.margin
    boxes = []
    for r, c in cells:
        x, y = c * cell + config.margin // 2 + rng.randint(0, slack), r * cell + config.margin // 2 + rng.randint(0, slack)
        boxes.append((x, y, x + config.object_size, y + config.object_size))
    return boxes, cells


def _place(config: WorldConfig, rng: random.Random) -> list[Box]:
    """Non-overlapping boxes (at least `margin` apart) at random places: rejection sampling."""
    size, gap, limit = config.object_size, config.margin, config.canvas_size - config.object_size
    boxes: list[Box] = []
    for _ in range(10_000):
        x, y = rng.randint(0, limit), rng.randint(0, limit)
        box = (x, y, x + size, y + size)
        if all(box[2] + gap <= b[0] or b[2] + gap <= box[0] or box[3] + gap <= b[1] or b[3] + gap <= box[1]
               for b in boxes):
            boxes.append(box)
            if len(boxes) == config.num_objects:
                return boxes
    raise AdapterError(f"could not place {config.num_objects} objects on the canvas: enlarge canvas_size")


def mark_ink(mark: str, u, v, width: int):
    """Whether the pattern `mark` inks the pixel at (u, v), coordinates inside the object's box
    (ints or numpy arrays)."""
    if mark == "horizontal":
        return (v // width) % 2 == 0
    if mark == "vertical":
        return (u // width) % 2 == 0
    if mark == "checkered":
        return (u // width + v // width) % 2 == 0
    if mark == "bricks":  # a checker of cells twice as wide as tall
        return (u // (2 * width) + v // width) % 2 == 0
    if mark == "tiles":  # a checker of cells twice as tall as wide
        return (u // width + v // (2 * width)) % 2 == 0
    if mark == "zigzag":  # horizontal stripes bent into a zigzag
        return ((v + abs(u % (4 * width) - 2 * width)) // width) % 2 == 0
    if mark == "waves":  # horizontal stripes bent into a sine wave
        return ((v + np.rint(width * np.sin(np.pi * np.asarray(u) / (2 * width)))).astype(int) // width) % 2 == 0
    period = 3 * width  # diagonals: stripes across u + v (or u - v), half ink
    return ((u + v) if mark == "diagonal" else (u - v)) % period < period // 2


def _shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, colour) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # diamond
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)


def render(config: WorldConfig, objects: list[WorldObject]) -> Image.Image:
    image = Image.new("RGB", (config.canvas_size,) * 2, config.background)
    size = config.object_size
    v, u = np.indices((size, size))
    for obj in objects:
        ink = mark_ink(obj.mark, u, v, config.mark_width)
        texture = np.where(ink[..., None], ImageColor.getrgb(config.mark_colour), ImageColor.getrgb(obj.colour))
        mask = Image.new("L", (size, size), 0)
        _shape(ImageDraw.Draw(mask), obj.shape, (0, 0, size, size), 255)
        image.paste(Image.fromarray(texture.astype(np.uint8), "RGB"), obj.box[:2], mask)
    return image
