"""Visual Genome: region_descriptions.json + image_data.json, images under VG_100K / VG_100K_2.

    vg:regions=region_descriptions.json,meta=image_data.json,images=VG[,exclude_coco_ids=test_ids.txt]
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipeline.sources.common import _clean, _load_json
from data_pipeline.sources.types import Record, SourceSpec, _read_ids, reader


@reader("vg")
def read(spec: SourceSpec) -> Iterator[Record]:
    """Region descriptions as captions (about 50 per image); optional drop of COCO ids."""
    regions_path, meta_path, images = spec.require("regions", "meta", "images")
    exclude_coco = _read_ids(spec.options["exclude_coco_ids"]) if "exclude_coco_ids" in spec.options else frozenset()
    meta = {str(m.get("image_id", m.get("id"))): m for m in _load_json(meta_path, "VG image data")}
    root = Path(images)
    for entry in _load_json(regions_path, "VG region descriptions"):
        image_id = str(entry.get("id", entry.get("image_id")))
        info = meta.get(image_id, {})
        if info.get("coco_id") is not None and str(info["coco_id"]) in exclude_coco:
            continue
        # VG splits its images over VG_100K and VG_100K_2; the URL names the folder.
        url_parts = str(info.get("url", "")).rstrip("/").split("/")
        candidates = [root / "/".join(url_parts[-2:]), root / url_parts[-1]] if len(url_parts) >= 2 else []
        path = next((c for c in candidates if c.is_file()), root / f"{image_id}.jpg")
        yield Record(spec.name, image_id, str(path), _clean(r.get("phrase") for r in entry.get("regions", [])),
                     root=images)
