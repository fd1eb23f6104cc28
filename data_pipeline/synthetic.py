"""A synthetic COCO-format source: coloured shapes whose captions fit only their own image.

    python -m data_pipeline.synthetic --out data/synthetic --num-images 2000 --seed 0

Each image holds two groups of shapes, e.g. two red circles on the left and one blue
square on the right, on a canvas of random size and aspect ratio. Its five captions name
counts, colours, shapes and where the groups are ("two red circles left of a blue square").
A caption drawn from another image almost never fits, so image-text matching can be learnt
only by looking at the pixels: a text-only model stays at chance.

Writes DIR/images/NNNNNNNNNNNN.jpg and DIR/annotations/captions.json (COCO captions layout).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 195, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "one", 2: "two", 3: "three"}
# relation of group A to group B, its inverse, and the side A sits on
RELATIONS = {"left of": ("right of", "left"), "right of": ("left of", "right"),
             "above": ("below", "top"), "below": ("above", "bottom")}


@dataclass(frozen=True)
class Group:
    count: int
    color: str
    shape: str

    def words(self, article: bool = True) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        number = "a" if self.count == 1 and article else NUMBERS[self.count]
        return f"{number} {self.color} {noun}"


def captions_for(a: Group, b: Group, relation: str) -> list[str]:
    inverse, side = RELATIONS[relation]
    other_side = RELATIONS[inverse][1]
    return [
        f"{a.words()} {relation} {b.words()}",
        f"{b.words()} {inverse} {a.words()}",
        f"{a.words(article=False)} on the {side}",
        f"there {'is' if b.count == 1 else 'are'} {b.words()} on the {other_side}",
        f"{a.words()} and {b.words()}",
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _place(rng: random.Random, region: tuple[int, int, int, int], size: int, count: int,
           taken: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """`count` non-overlapping boxes of `size` inside `region` (rejection sampling)."""
    x0, y0, x1, y1 = region
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(500):
        if len(boxes) == count:
            break
        x, y = rng.randint(x0, max(x0, x1 - size)), rng.randint(y0, max(y0, y1 - size))
        box = (x, y, x + size, y + size)
        if all(box[2] + 4 <= o[0] or o[2] + 4 <= box[0] or box[3] + 4 <= o[1] or o[3] + 4 <= box[1]
               for o in taken + boxes):
            boxes.append(box)
    if len(boxes) < count:
        raise RuntimeError("could not place shapes")  # caller retries with a new layout
    return boxes


@dataclass(frozen=True)
class Scene:
    """One image and what is in it: group `a` sits on `side` of the image, `b` opposite."""

    image: Image.Image
    a: Group
    b: Group
    relation: str  # a's relation to b, a key of RELATIONS

    @property
    def sides(self) -> tuple[str, str]:
        """Where a and b are: left/right/top/bottom."""
        inverse, side = RELATIONS[self.relation]
        return side, RELATIONS[inverse][1]


def make_image(rng: random.Random, min_side: int, max_side: int) -> tuple[Image.Image, list[str]]:
    scene = make_scene(rng, min_side, max_side)
    return scene.image, captions_for(scene.a, scene.b, scene.relation)


def make_scene(rng: random.Random, min_side: int, max_side: int) -> Scene:
    """Two groups of shapes on either side of a canvas of random size; `rng` is the only randomness."""
    while True:
        width, height = rng.randint(min_side, max_side), rng.randint(min_side, max_side)
        a = Group(rng.randint(1, 3), rng.choice(list(COLORS)), rng.choice(SHAPES))
        b = Group(rng.randint(1, 3), rng.choice(list(COLORS)), rng.choice(SHAPES))
        if (a.color, a.shape) == (b.color, b.shape):
            continue
        relation = rng.choice(list(RELATIONS))
        half_w, half_h = width // 2, height // 2
        regions = {"left of": ((0, 0, half_w, height), (half_w, 0, width, height)),
                   "right of": ((half_w, 0, width, height), (0, 0, half_w, height)),
                   "above": ((0, 0, width, half_h), (0, half_h, width, height)),
                   "below": ((0, half_h, width, height), (0, 0, width, half_h))}[relation]
        size = int(min(width, height) * rng.uniform(0.14, 0.2))
        try:
            boxes_a = _place(rng, regions[0], size, a.count, [])
            boxes_b = _place(rng, regions[1], size, b.count, boxes_a)
        except RuntimeError:
            continue
        shade = rng.randint(200, 245)
        image = Image.new("RGB", (width, height), (shade, shade, shade))
        draw = ImageDraw.Draw(image)
        for group, boxes in ((a, boxes_a), (b, boxes_b)):
            for box in boxes:
                _draw_shape(draw, group.shape, box, COLORS[group.color])
        return Scene(image, a, b, relation)


def generate(out: str | Path, num_images: int, seed: int, min_side: int = 192, max_side: int = 448) -> Path:
    """Write the dataset; returns the captions JSON path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        rng = random.Random(f"{seed}-{image_id}")  # per-image stream: the same image for any N
        image, captions = make_image(rng, min_side, max_side)
        file_name = f"{image_id:012d}.jpg"
        image.save(out / "images" / file_name, quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for caption in captions:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
    path = out / "annotations" / "captions.json"
    path.write_text(json.dumps({"info": {"description": "pixelbert-dist synthetic shapes", "seed": seed},
                                "images": images, "annotations": annotations}))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.synthetic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-images", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=192)
    parser.add_argument("--max-side", type=int, default=448)
    args = parser.parse_args(argv)
    path = generate(args.out, args.num_images, args.seed, args.min_side, args.max_side)
    print(f"wrote {args.num_images} images; source spec: coco:captions={path},images={Path(args.out) / 'images'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
