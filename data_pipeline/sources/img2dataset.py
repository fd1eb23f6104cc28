"""img2dataset output: a folder of `webdataset` shards (NNNNN.tar) or `files` (NNNNN/KEY.jpg + .txt).

    img2dataset:path=out_folder

Every file read must resolve inside the folder and be a regular file: a tar that is not stops
the job (SourceError, named); a caption that is not, or is over 1 MiB, is a bad record; an
image that is not is skipped at sharding (`unsafe_path`, `not_a_file`, `too_large`).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.sources.common import _clean
from data_pipeline.sources.types import Record, SourceError, SourceSpec, reader
from data_pipeline.storage.local import SourceRefused, open_source_file, read_source_file

MAX_CAPTION_BYTES = 1 << 20


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
            yield from _img2dataset_tar(spec, tar_path, path)
        return
    for image in sorted(root.glob("*/*.jpg")):
        caption = _read_text(spec, image.with_suffix(".txt"), path)
        yield Record(spec.name, image.stem, str(image), _clean([caption]), root=path)


def _read_text(spec: SourceSpec, path: Path, root: str) -> str | None:
    try:
        return read_source_file(str(path), None, root, MAX_CAPTION_BYTES).decode("utf-8")
    except FileNotFoundError:
        return None
    except SourceRefused as refused:
        spec.bad_records.append(f"{path}: caption not read: {refused}")
        return None
    except UnicodeDecodeError:
        spec.bad_records.append(f"{path}: caption not UTF-8")
        return None


def _img2dataset_tar(spec: SourceSpec, tar_path: Path, root: str) -> Iterator[Record]:
    """Index a tar: images become byte ranges; captions (.txt) are read now, they are small."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        stream = open_source_file(str(tar_path), root)
    except SourceRefused as refused:
        raise SourceError(f"img2dataset output {root}: {refused}") from None
    with stream, tarfile.open(fileobj=stream) as tar:
        for info in tar:
            if info.isfile() and "." in info.name:
                stem, ext = info.name.split(".", 1)
                members.setdefault(stem, {})[ext] = info
        for stem, parts in members.items():
            image = parts.get("jpg") or parts.get("png") or parts.get("webp")
            if image is None:
                continue
            caption = None
            if "txt" in parts and parts["txt"].size > MAX_CAPTION_BYTES:
                spec.bad_records.append(f"{tar_path}:{stem}.txt: caption of {parts['txt'].size} bytes, "
                                        f"over the cap of {MAX_CAPTION_BYTES}")
            elif "txt" in parts:
                try:
                    caption = tar.extractfile(parts["txt"]).read().decode("utf-8")
                except UnicodeDecodeError:
                    spec.bad_records.append(f"{tar_path}:{stem}.txt: caption not UTF-8")
            yield Record(spec.name, Path(stem).name, str(tar_path), _clean([caption]),
                         (image.offset_data, image.size), root=root)
