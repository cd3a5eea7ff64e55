"""Prompt templates and class-name sets for zero-shot classification.

A template is a sentence with one ``{}`` where the class name goes. Zero-shot
classification embeds every template filled with every class name and averages each
class's normalised prompt embeddings (see :mod:`specs_metric.evaluation.zeroshot`). The sets
below were written for this project: short everyday descriptions of photos for ImageNet,
descriptions that fit small, low-resolution pictures for CIFAR, and descriptions of flat
rendered drawings for the synthetic world.
"""

from __future__ import annotations

import json
from pathlib import Path

from specs_metric.errors import UsageError, reading
from specs_metric.io.reading import read_text
from specs_metric.limits import MAX_JSON_INPUT_BYTES

TEMPLATES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of a {}.",),
    "imagenet": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a picture showing a {}.",
        "an image that contains a {}.",
        "a snapshot of a {}.",
        "a close view of a {}.",
        "a {} seen from far away.",
        "a blurry picture of a {}.",
        "a dim picture of the {}.",
        "a brightly lit picture of the {}.",
        "a grainy photo of a {}.",
        "a photo with a {} in the middle.",
        "a small {} in a photo.",
        "a large {} in a photo.",
        "a sketch of a {}.",
        "a cartoon drawing of a {}.",
        "an oil painting of a {}.",
        "a toy version of a {}.",
        "a figurine of a {}.",
        "a {} in a photo taken outdoors.",
        "a {} in a photo taken indoors.",
        "a black-and-white photo of a {}.",
        "a cropped picture of the {}.",
        "a photo of several {}.",
        "a {} as seen in a magazine.",
        "an amateur photo of a {}.",
        "a professional photo of the {}.",
        "a poorly framed photo of a {}.",
        "the {}, photographed.",
        "something that looks like a {}.",
    ),
    "cifar": (
        "a photo of a {}.",
        "a tiny photo of a {}.",
        "a small, low-resolution picture of a {}.",
        "a blurry image of the {}.",
        "a pixelated photo of a {}.",
        "a thumbnail showing a {}.",
        "a photo of the small {}.",
        "a photo of the big {}.",
        "a fuzzy picture with a {} in it.",
        "a {} in a low-quality photo.",
        "a close view of the {}.",
        "a dark picture of a {}.",
        "a bright picture of a {}.",
        "an image of one {}.",
    ),
    "synthetic": (
        "a {} shape.",
        "a picture with a {}.",
        "a drawing that contains a {}.",
        "a simple image with a {} in it.",
        "there is a {}.",
        "a rendered {} on a plain background.",
    ),
    # For colour classes of the synthetic world (e.g. the background colour).
    "synthetic-colour": (
        "the background is {}.",
        "a picture with a {} background.",
        "a drawing on a plain {} background.",
        "an image whose background colour is {}.",
    ),
}

# Class-name sets available by name (``--classes NAME``); others come from a file.
CLASS_SETS: dict[str, tuple[str, ...]] = {
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
    # CIFAR-100 fine labels in label order (alphabetical); underscores become spaces.
    "cifar100": tuple(
        """
        apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge
        bus butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud
        cockroach couch crab crocodile cup dinosaur dolphin elephant flatfish forest fox
        girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
        man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter
        palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit
        raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
        spider squirrel streetcar sunflower sweet_pepper table tank telephone television
        tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm
        """.split()
    ),
}


def _synthetic_sets() -> dict[str, tuple[str, ...]]:
    from specs_metric.synth.world import COLOUR_NAMES, SHAPES

    return {"synthetic-colours": tuple(COLOUR_NAMES), "synthetic-shapes": tuple(SHAPES)}


def check_template(template: str, where: str = "template") -> str:
    """Return ``template`` if it has exactly one ``{}`` placeholder, else raise UsageError."""
    rest = template.replace("{}", "")
    if template.count("{}") != 1 or "{" in rest or "}" in rest:
        raise UsageError(f"{where}: {template!r} needs exactly one '{{}}' and no other braces")
    return template


def get_templates(spec: str) -> tuple[str, ...]:
    """Templates from a set name (:data:`TEMPLATES`), a file, or one literal template.

    A file holds one template per line (blank lines and lines starting with ``#`` are
    ignored) or, with a ``.json`` suffix, a JSON list of strings. A literal template is any
    text containing ``{}``, e.g. ``"a photo of a {}."``.

    Raises:
        UsageError: an unknown name, an empty set, or a template without exactly one ``{}``.
    """
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec)
    if path.is_file():
        with reading(path, UsageError):
            text = read_text(path, MAX_JSON_INPUT_BYTES, error=UsageError)
            is_json = path.suffix.lower() == ".json"
            items = json.loads(text) if is_json else None
        if is_json:
            if not isinstance(items, list) or not all(isinstance(t, str) for t in items):
                raise UsageError(f"{path}: expected a JSON list of template strings")
            lines = [(f"{path}, item {i}", t) for i, t in enumerate(items)]
        else:
            lines = [
                (f"{path}, line {i}", t.strip())
                for i, t in enumerate(text.splitlines(), 1)
                if t.strip() and not t.strip().startswith("#")
            ]
        if not lines:
            raise UsageError(f"{path}: no templates")
        return tuple(check_template(t, where) for where, t in lines)
    if "{}" in spec:
        return (check_template(spec, "--templates"),)
    raise UsageError(
        f"--templates {spec!r}: not a template set ({', '.join(TEMPLATES)}), not a file, "
        "and not a template with '{}'"
    )


def _class_name(value: str) -> str:
    """Folder-style names read as words: ``maple_tree`` -> ``maple tree``."""
    return value.replace("_", " ").strip()


def class_set_names() -> list[str]:
    """Names accepted by ``--classes`` besides files."""
    return [*CLASS_SETS, *_synthetic_sets()]


def get_classes(spec: str) -> tuple[list[str], list[str]]:
    """Classes from a set name or a file, as ``(keys, names)``.

    ``keys`` are what labels in the data refer to (a folder name, a label string), ``names``
    what the prompts say. Formats:

    * a set name from :func:`class_set_names` (keys = names);
    * a ``.json`` file with a list of names, or an object ``{key: name}`` (e.g. ImageNet
      folder ids to readable names), in class order;
    * any other file: one name per line (blank lines ignored); a line ``key<TAB>name``
      gives a key different from the name.

    Underscores in names become spaces in prompts.

    Raises:
        UsageError: unknown name, empty list, or duplicate keys.
    """
    sets = {**CLASS_SETS, **_synthetic_sets()}
    if spec in sets:
        keys = list(sets[spec])
        names = list(keys)
    else:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(
                f"--classes {spec!r}: not a file and not a class set ({', '.join(sets)})"
            )
        with reading(path, UsageError):
            text = read_text(path, MAX_JSON_INPUT_BYTES, error=UsageError)
            is_json = path.suffix.lower() == ".json"
            data = json.loads(text) if is_json else None
        if is_json:
            if isinstance(data, list) and all(isinstance(v, str) for v in data):
                keys, names = list(data), list(data)
            elif isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
                keys, names = list(data), list(data.values())
            else:
                raise UsageError(f"{path}: expected a JSON list of names or an object key -> name")
        else:
            keys, names = [], []
            for line in text.splitlines():
                if not line.strip():
                    continue
                key, _, name = line.partition("\t")
                keys.append(key.strip())
                names.append((name or key).strip())
    if not keys:
        raise UsageError(f"--classes {spec!r}: no classes")
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise UsageError(f"--classes {spec!r}: class {key!r} is listed twice")
        seen.add(key)
    return keys, [_class_name(n) for n in names]
