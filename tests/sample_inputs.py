"""Small image-caption inputs in every source format, good and bad, made on the fly."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def jpeg(width: int = 96, height: int = 80, color=(200, 30, 30), mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, (width, height), color).save(out, format="JPEG", quality=90)
    return out.getvalue()


def png_with_alpha(width: int = 90, height: int = 70) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (10, 200, 10, 128)).save(out, format="PNG")
    return out.getvalue()


def bomb_header() -> bytes:
    """A PNG whose header claims 50000x50000 pixels (a few KB on disk)."""
    out = io.BytesIO()
    Image.new("1", (50000, 50000)).save(out, format="PNG")
    return out.getvalue()


def write_coco(root: Path, images: dict[int, bytes], captions: dict[int, list[str]],
               extra_entries: dict[int, str] | None = None) -> Path:
    """COCO captions JSON + image folder; `extra_entries` lists ids whose file is absent."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, data in images.items():
        name = f"{image_id:012d}.jpg"
        (root / "images" / name).write_bytes(data)
        entries.append({"id": image_id, "file_name": name, "width": 0, "height": 0})
    for image_id, name in (extra_entries or {}).items():
        entries.append({"id": image_id, "file_name": name, "width": 0, "height": 0})
    annotations = [{"id": i, "image_id": image_id, "caption": c}
                   for i, (image_id, c) in enumerate((k, c) for k, cs in captions.items() for c in cs)]
    path = root / "captions.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return path


def write_visual_genome(root: Path, images: dict[int, bytes], coco_ids: dict[int, int]) -> tuple[Path, Path]:
    (root / "VG_100K").mkdir(parents=True, exist_ok=True)
    meta, regions = [], []
    for image_id, data in images.items():
        (root / "VG_100K" / f"{image_id}.jpg").write_bytes(data)
        meta.append({"image_id": image_id, "width": 0, "height": 0, "coco_id": coco_ids.get(image_id),
                     "url": f"https://example.invalid/VG_100K/{image_id}.jpg"})
        regions.append({"id": image_id, "regions": [
            {"region_id": image_id * 10 + r, "image_id": image_id, "phrase": f"region {r} of image {image_id}"}
            for r in range(3)] + [{"region_id": 0, "image_id": image_id, "phrase": "region 0 of image %d" % image_id}]})
    (root / "image_data.json").write_text(json.dumps(meta))
    (root / "region_descriptions.json").write_text(json.dumps(regions))
    return root / "region_descriptions.json", root / "image_data.json"


def write_manifests(root: Path, images: dict[str, bytes]) -> dict[str, Path]:
    """The same rows as JSONL (relative paths, caption lists), CSV (file:// URIs) and parquet."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    rows = []
    for key, data in images.items():
        (root / "imgs" / f"{key}.jpg").write_bytes(data)
        rows.append({"key": key, "image": f"imgs/{key}.jpg", "captions": [f"caption one of {key}", f"caption two of {key}"]})
    paths = {"jsonl": root / "pairs.jsonl", "csv": root / "pairs.csv", "parquet": root / "pairs.parquet"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_lines = ["key,url,caption"] + [f"{r['key']},file://{root / r['image']},{r['captions'][0]}" for r in rows]
    paths["csv"].write_text("\n".join(csv_lines) + "\n")
    pq.write_table(pa.Table.from_pylist([{"id": r["key"], "path": str(root / r["image"]),
                                          "text": r["captions"][0]} for r in rows]), paths["parquet"])
    return paths


def write_img2dataset_tar(root: Path, images: dict[str, bytes]) -> Path:
    """img2dataset's webdataset output: NNNNN.tar with KEY.jpg, KEY.txt, KEY.json."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "00000.tar", "w") as tar:
        for key, data in images.items():
            for ext, payload in (("jpg", data), ("txt", f"web caption {key}".encode()),
                                 ("json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return root


def write_img2dataset_files(root: Path, images: dict[str, bytes]) -> Path:
    """img2dataset's `files` output: NNNNN/KEY.jpg + KEY.txt."""
    (root / "00000").mkdir(parents=True, exist_ok=True)
    for key, data in images.items():
        (root / "00000" / f"{key}.jpg").write_bytes(data)
        (root / "00000" / f"{key}.txt").write_text(f"file caption {key}")
    return root
