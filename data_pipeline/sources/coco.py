"""COCO captions: a captions_*.json (`images` + `annotations`) and its image folder.

    coco:captions=annotations/captions_train2017.json,images=train2017
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipeline.sources.common import _clean, _load_json
from data_pipeline.sources.types import Record, SourceSpec, reader


@reader("coco")
def read(spec: SourceSpec) -> Iterator[Record]:
    captions_path, images = spec.require("captions", "images")
    data = _load_json(captions_path, "COCO captions")
    by_image: dict[int, list[str]] = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann.get("caption"))
    for image in data.get("images", []):
        yield Record(spec.name, str(image["id"]), str(Path(images) / image["file_name"]),
                     _clean(by_image.get(image["id"], [])), root=images)
