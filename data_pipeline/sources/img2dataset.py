"""img2dataset output: a folder of `webdataset` shards (NNNNN.tar) or `files` (NNNNN/KEY.jpg + .txt).

    img2dataset:path=out_folder
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.sources.common import _clean
from data_pipeline.sources.types import Record, SourceError, SourceSpec, reader


@reader("img2dataset")
def read(spec: SourceSpec) -> Iterator[Record]:
    """img2dataset output in `webdataset` (NNNNN.tar) or `files` (NNNNN/KEY.jpg) format."""
    (path,) = spec.require("path")
    root = Path(path)
    if not root.is_dir():
        raise SourceError(f"img2dataset output {root} is not a folder")
    tars = sorted(root.glob("*.tar"))
    if tars:
        for tar_path in tars:
            yield from _img2dataset_tar(spec, tar_path)
        return
    for image in sorted(root.glob("*/*.jpg")):
        caption = _read_text(spec, image.with_suffix(".txt"))
        yield Record(spec.name, image.stem, str(image), _clean([caption]))


def _read_text(spec: SourceSpec, path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        spec.bad_records.append(f"{path}: caption not UTF-8")
        return None


def _img2dataset_tar(spec: SourceSpec, tar_path: Path) -> Iterator[Record]:
    """Index a tar: images become byte ranges; captions (.txt) are read now, they are small."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            if info.isfile() and "." in info.name:
                stem, ext = info.name.split(".", 1)
                members.setdefault(stem, {})[ext] = info
        for stem, parts in members.items():
            image = parts.get("jpg") or parts.get("png") or parts.get("webp")
            if image is None:
                continue
            caption = None
            if "txt" in parts:
                try:
                    caption = tar.extractfile(parts["txt"]).read().decode("utf-8")
                except UnicodeDecodeError:
                    spec.bad_records.append(f"{tar_path}:{stem}.txt: caption not UTF-8")
            yield Record(spec.name, Path(stem).name, str(tar_path), _clean([caption]),
                         (image.offset_data, image.size))
