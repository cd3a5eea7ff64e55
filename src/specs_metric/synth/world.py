"""Scene graphs of the synthetic specificity world, and their facts.

A scene is a plain background colour and 3 to 8 objects on a 3x3 grid, at most one object
per cell and never two objects with the same colour and shape, so that "the red star"
always names exactly one object. Everything a caption can say about a scene is a
:class:`Fact`; :func:`truth` decides a fact against a scene.

The world's parameters are fixed here and documented in ``docs/synthetic-world.md``. They
were chosen before any model was evaluated on the world and must not be tuned to make a
model look better:

* colours (12): red, orange, yellow, green, blue, purple, pink, brown, black, white, gray,
  teal; the background is one of the same colours and no object has the background colour;
* shapes (8): circle, square, triangle, diamond, star, cross, heart, ring;
* sizes (3): small, medium, large (radius 0.22, 0.33, 0.45 of a grid cell);
* textures (4): solid, striped, dotted, checked;
* positions (9): the cells of a 3x3 grid, named "top left", "top middle", ..., "center", ...,
  "bottom right";
* objects per scene: uniform in 3..8; cells, colours, shapes, sizes and textures uniform
  among the allowed values;
* relations ("left of", "right of", "above", "below") are stated only between two objects
  in the same row or the same column, where they are unambiguous; at most
  :data:`MAX_RELATIONS` per scene;
* held-out colour-shape pairs (:data:`HELD_OUT_PAIRS`, one per shape): training scenes never
  contain them (nor do training captions mention them); every test scene contains at least
  one of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (250, 140, 10),
    "yellow": (250, 220, 30),
    "green": (40, 160, 50),
    "blue": (35, 80, 220),
    "purple": (130, 50, 170),
    "pink": (250, 140, 190),
    "brown": (130, 80, 35),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "teal": (0, 128, 128),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "cross",
    "heart",
    "ring",
)
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Object radius as a fraction of the grid cell's side, per size.
SIZE_RADIUS: dict[str, float] = {"small": 0.22, "medium": 0.33, "large": 0.45}
TEXTURES: tuple[str, ...] = ("solid", "striped", "dotted", "checked")
GRID = 3
# Cell names in row-major order (row 0 is the top row, column 0 the left column).
POSITIONS: tuple[str, ...] = (
    "top left",
    "top middle",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom middle",
    "bottom right",
)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
MIN_OBJECTS = 3
MAX_OBJECTS = 8
MAX_RELATIONS = 3
# (colour, shape) pairs that only test scenes contain: one per shape, all colours distinct.
HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("green", "circle"),
    ("purple", "square"),
    ("blue", "triangle"),
    ("orange", "diamond"),
    ("red", "star"),
    ("yellow", "cross"),
    ("brown", "heart"),
    ("pink", "ring"),
)

Split = Literal["train", "test"]


@dataclass(frozen=True)
class SceneObject:
    """One object: its colour and shape identify it within its scene."""

    shape: str
    colour: str
    size: str
    texture: str
    cell: int  # index into POSITIONS

    @property
    def key(self) -> tuple[str, str]:
        """(colour, shape): unique within a scene."""
        return (self.colour, self.shape)

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def column(self) -> int:
        return self.cell % GRID


@dataclass(frozen=True)
class Scene:
    """A background colour and its objects (in caption order)."""

    background: str
    objects: tuple[SceneObject, ...]

    def find(self, colour: str, shape: str) -> SceneObject | None:
        """The object with this colour and shape, or None."""
        for obj in self.objects:
            if obj.key == (colour, shape):
                return obj
        return None

    def to_dict(self) -> dict:
        """JSON-ready form (see :meth:`from_dict`)."""
        return {"background": self.background, "objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(data["background"], tuple(SceneObject(**o) for o in data["objects"]))


@dataclass(frozen=True)
class Fact:
    """One statement about a scene.

    ``kind`` is one of ``background`` (``value`` = colour), ``exists`` (the object
    ``subject`` = (colour, shape) is present), ``size`` / ``texture`` / ``position``
    (``value`` = size name / texture name / cell index as a string) and ``relation``
    (``value`` = one of :data:`RELATIONS`, ``other`` = the second object).
    """

    kind: str
    subject: tuple[str, str] | None = None
    value: str = ""
    other: tuple[str, str] | None = None


def truth(fact: Fact, scene: Scene) -> bool | None:
    """Decide a fact against a scene: True, False, or None when the scene does not settle it.

    Statements about an object the scene lacks are false. A relation between two present
    objects is true when they share the row (left/right) or column (above/below) in the
    stated order, false when the stated order is violated along that axis (e.g. "A is left
    of B" with A not left of B), and undecided when only the other axis differs.
    """
    if fact.kind == "background":
        return scene.background == fact.value
    assert fact.subject is not None
    obj = scene.find(*fact.subject)
    if fact.kind == "exists":
        return obj is not None
    if obj is None:
        return False
    if fact.kind == "size":
        return obj.size == fact.value
    if fact.kind == "texture":
        return obj.texture == fact.value
    if fact.kind == "position":
        return obj.cell == int(fact.value)
    if fact.kind == "relation":
        assert fact.other is not None
        other = scene.find(*fact.other)
        if other is None:
            return False
        horizontal = fact.value in ("left of", "right of")
        if horizontal:
            ordered = (
                obj.column < other.column if fact.value == "left of" else obj.column > other.column
            )
            aligned = obj.row == other.row
        else:
            ordered = obj.row < other.row if fact.value == "above" else obj.row > other.row
            aligned = obj.column == other.column
        if not ordered:
            return False
        return True if aligned else None
    raise ValueError(f"unknown fact kind {fact.kind!r}")


def held_out(colour: str, shape: str) -> bool:
    """Whether (colour, shape) is reserved for test scenes."""
    return (colour, shape) in HELD_OUT_PAIRS


def scene_rng(seed: int, split: Split, index: int) -> np.random.Generator:
    """Independent random stream of one scene (same seed, split, index -> same scene)."""
    return np.random.default_rng([seed, 0 if split == "train" else 1, index])


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, split: Split) -> Scene:
    """Draw one scene; test scenes contain a held-out pair, training scenes none."""
    background = _pick(rng, COLOUR_NAMES)
    n_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = rng.permutation(GRID * GRID)[:n_objects]
    keys: list[tuple[str, str]] = []
    if split == "test":
        first = [p for p in HELD_OUT_PAIRS if p[0] != background]
        keys.append(first[int(rng.integers(len(first)))])
    pairs = [
        (c, s)
        for c in COLOUR_NAMES
        for s in SHAPES
        if c != background and (split == "test" or not held_out(c, s))
    ]
    while len(keys) < n_objects:
        pair = pairs[int(rng.integers(len(pairs)))]
        if pair not in keys:
            keys.append(pair)
    order = rng.permutation(n_objects)  # the held-out object is not always mentioned first
    objects = tuple(
        SceneObject(
            shape=keys[i][1],
            colour=keys[i][0],
            size=_pick(rng, SIZES),
            texture=_pick(rng, TEXTURES),
            cell=int(cells[i]),
        )
        for i in order
    )
    return Scene(background, objects)


def relation_candidates(scene: Scene) -> list[Fact]:
    """Every unambiguous relation (same row or column), each pair stated one way.

    The direction ("left of" vs "right of", "above" vs "below") is fixed by the order of
    the pair in the scene so that sampling from this list stays deterministic.
    """
    facts = []
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1 :]:
            if a.row == b.row:
                value = "left of" if a.column < b.column else "right of"
            elif a.column == b.column:
                value = "above" if a.row < b.row else "below"
            else:
                continue
            facts.append(Fact("relation", a.key, value, b.key))
    return facts


def scene_facts(scene: Scene, relations: list[Fact]) -> list[Fact]:
    """The facts of a full description, in caption order.

    Background first, then for each object its existence, size, texture and position,
    then the chosen relations.
    """
    facts = [Fact("background", value=scene.background)]
    for obj in scene.objects:
        facts += [
            Fact("exists", obj.key),
            Fact("size", obj.key, obj.size),
            Fact("texture", obj.key, obj.texture),
            Fact("position", obj.key, str(obj.cell)),
        ]
    return facts + relations
