"""Karpathy's split files (dataset_coco.json / dataset_flickr30k.json): images at images/filepath/filename.

    karpathy:path=dataset_coco.json,images=COCO_ROOT,split=train+restval

The images of the `+`-joined splits with their raw sentences; ids are `cocoid`, else `imgid`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipeline.sources.common import _clean, _json_list, _load_json
from data_pipeline.sources.types import Record, SourceError, SourceSpec, reader

KARPATHY_SPLITS = ("train", "val", "test", "restval")


@reader("karpathy")
def read(spec: SourceSpec) -> Iterator[Record]:
    """Karpathy's split files: the images of the chosen splits with their sentences."""
    path, images, split = spec.require("path", "images", "split")
    splits = set(split.split("+"))
    if not splits <= set(KARPATHY_SPLITS):
        raise SourceError(f"source {spec.name}: split {split!r}: each of its +-joined parts must be one of "
                          f"{', '.join(KARPATHY_SPLITS)}")
    entries = _json_list(_load_json(path, "Karpathy split"), "images", path, "Karpathy split")
    root = Path(images)
    for number, entry in enumerate(entries):
        try:
            image_id = entry["cocoid"] if "cocoid" in entry else entry["imgid"]
            location = root / entry.get("filepath", "") / entry["filename"]
            in_split = entry["split"] in splits
            captions = _clean(s.get("raw") for s in entry["sentences"])
        except (KeyError, TypeError, AttributeError) as err:
            raise SourceError(f"Karpathy split {path}: image {number} lacks a valid cocoid/imgid, filename, "
                              f"split or sentences[].raw ({type(err).__name__}: {err})") from None
        if in_split:
            yield Record(spec.name, str(image_id), str(location), captions, root=images)
