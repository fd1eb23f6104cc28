"""Image-caption sources, each read into `Record`s: one per image, with all its captions.

A source is named on the command line as `KIND:option=value,option=value`:

    coco:captions=annotations/captions_train2017.json,images=train2017
    vg:regions=region_descriptions.json,meta=image_data.json,images=VG,exclude_coco_ids=test_ids.txt
    manifest:path=pairs.parquet[,image_column=image][,caption_column=caption][,key_column=key]
    img2dataset:path=out_folder

Downstream tasks, in each dataset's own file format (captions are the task's texts, and
`targets` holds one label per text, aligned with it):

    vqa:questions=v2_OpenEnded_mscoco_train2014_questions.json,annotations=v2_mscoco_train2014_annotations.json,images=train2014[,prefix=COCO_train2014_]
    nlvr2:path=train.json,images=images/train
    karpathy:path=dataset_coco.json,images=COCO_ROOT,split=train+restval

`vqa`: one record per image, its questions as captions, targets `{"question_id", "answers"}`
(the 10 raw annotator answers; [] without `annotations`, as for test-dev). Images are
`{prefix}{image_id:012d}.jpg`; the prefix defaults to COCO's from the questions file's
`data_subtype` (`test-dev2015` -> `COCO_test2015_`). `nlvr2`: one record per image pair,
`image` the left (`-img0.png`), `image2` the right (`-img1.png`), inside the line's
`directory` subfolder where it has one (train); targets `{"label": bool, "identifier"}`.
`karpathy`: Karpathy's dataset_coco.json / dataset_flickr30k.json, the images of the
`+`-joined splits, at images/filepath/filename; ids are `cocoid`, else `imgid`.

Every kind also takes `name=` (the tag written into each sample; default the kind),
`include=FILE` and `exclude=FILE` (image ids, one per line: the source's own ids, e.g.
COCO image ids for the Karpathy train+restval split).
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("coco", "vg", "manifest", "img2dataset", "vqa", "nlvr2", "karpathy")
KARPATHY_SPLITS = ("train", "val", "test", "restval")
SAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")
MAX_KEY_LENGTH = 90  # a tar member name (key + extension) must fit ustar's 100 bytes


class SourceError(ValueError):
    """A source that cannot be read at all (missing file, malformed spec): stops before any work."""


@dataclass(frozen=True)
class Record:
    """One image (or image pair) and its texts, before the image is read."""

    source: str                    # the source's tag
    source_id: str                 # the image's id inside its source
    image: str                     # path, file:// or s3:// URI (NLVR2: the left image)
    captions: tuple[str, ...]
    byte_range: tuple[int, int] | None = None  # (offset, length) inside `image`, for tar members
    targets: tuple | None = None   # task sources: one JSON-serialisable label per caption, aligned
    image2: str | None = None      # a second image (NLVR2: the right one)

    @property
    def key(self) -> str:
        """Unique sample key: no dots (WebDataset splits the extension at the first dot)."""
        key = f"{self.source}_{SAFE_KEY.sub('_', self.source_id)}"
        if len(key) > MAX_KEY_LENGTH:
            import hashlib
            key = f"{self.source}_{hashlib.sha1(self.source_id.encode()).hexdigest()}"
        return key


@dataclass
class SourceSpec:
    kind: str
    options: dict[str, str]
    name: str = ""
    include: frozenset[str] | None = None
    exclude: frozenset[str] = field(default_factory=frozenset)
    bad_records: list[str] = field(default_factory=list)  # lines that could not be parsed

    @classmethod
    def parse(cls, text: str) -> "SourceSpec":
        kind, _, rest = text.partition(":")
        if kind not in KINDS:
            raise SourceError(f"source {text!r}: kind must be one of {', '.join(KINDS)}")
        options = {}
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise SourceError(f"source {text!r}: expected option=value, got {item!r}")
            options[key.strip()] = value.strip()
        name = options.pop("name", kind)
        if SAFE_KEY.search(name):
            raise SourceError(f"source {text!r}: name {name!r} may hold only letters, digits, _ and -")
        include = _read_ids(options.pop("include")) if "include" in options else None
        exclude = _read_ids(options.pop("exclude")) if "exclude" in options else frozenset()
        return cls(kind, options, name, include, exclude)

    def require(self, *names: str) -> list[str]:
        missing = [n for n in names if n not in self.options]
        if missing:
            raise SourceError(f"source {self.name}: missing option(s) {', '.join(missing)}")
        return [self.options[n] for n in names]

    def keeps(self, source_id: str) -> bool:
        return (self.include is None or source_id in self.include) and source_id not in self.exclude


def _read_ids(path: str) -> frozenset[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise SourceError(f"id list {path}: {err}") from None
    if text.lstrip().startswith("["):
        return frozenset(str(i) for i in json.loads(text))
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def _load_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as err:
        raise SourceError(f"{what} {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise SourceError(f"{what} {path}: not valid JSON: {err}") from None


def read_records(spec: SourceSpec) -> Iterator[Record]:
    """Records of one source, filtered by its include/exclude lists, in the source's order."""
    reader = {"coco": _coco, "vg": _visual_genome, "manifest": _manifest, "img2dataset": _img2dataset,
              "vqa": _vqa, "nlvr2": _nlvr2, "karpathy": _karpathy}
    for record in reader[spec.kind](spec):
        if spec.keeps(record.source_id):
            yield record


def _clean(captions) -> tuple[str, ...]:
    """Strip and de-duplicate (in order); non-strings and blanks are dropped here and counted later."""
    seen = dict.fromkeys(c.strip() for c in captions if isinstance(c, str) and c.strip())
    return tuple(seen)


def _clean_aligned(texts, targets) -> tuple[tuple[str, ...], tuple]:
    """Strip; a blank or non-string text is dropped with its target. No de-duplication: a task
    may ask the same question twice, and each copy has its own id and answers."""
    kept = [(t.strip(), target) for t, target in zip(texts, targets) if isinstance(t, str) and t.strip()]
    return tuple(t for t, _ in kept), tuple(target for _, target in kept)


def _coco(spec: SourceSpec) -> Iterator[Record]:
    captions_path, images = spec.require("captions", "images")
    data = _load_json(captions_path, "COCO captions")
    by_image: dict[int, list[str]] = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann.get("caption"))
    for image in data.get("images", []):
        yield Record(spec.name, str(image["id"]), str(Path(images) / image["file_name"]),
                     _clean(by_image.get(image["id"], [])))


def _visual_genome(spec: SourceSpec) -> Iterator[Record]:
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
        yield Record(spec.name, image_id, str(path), _clean(r.get("phrase") for r in entry.get("regions", [])))


def _manifest(spec: SourceSpec) -> Iterator[Record]:
    """JSONL, CSV or parquet rows: image location, caption(s), optional key."""
    (path,) = spec.require("path")
    image_col = spec.options.get("image_column", "image")
    caption_col = spec.options.get("caption_column", "")
    key_col = spec.options.get("key_column", "key")
    base = Path(path).parent
    for index, row in enumerate(_manifest_rows(spec, path)):
        if image_col not in row:
            raise SourceError(f"manifest {path}: row {index} has no column {image_col!r} "
                              f"(columns: {', '.join(map(str, row))}); set image_column=")
        captions = _row_captions(row, caption_col)
        location = str(row[image_col])
        if "://" not in location and not Path(location).is_absolute():
            location = str(base / location)  # relative paths are relative to the manifest
        source_id = str(row[key_col]) if row.get(key_col) not in (None, "") else str(index)
        yield Record(spec.name, source_id, location, captions)


def _row_captions(row: dict, column: str) -> tuple[str, ...]:
    if column:
        value = row.get(column)
    elif "captions" in row:
        value = row["captions"]
    else:
        value = row.get("caption")
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:  # a CSV cell holding a JSON list of captions
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if isinstance(value, str) or value is None:
        value = [value]
    return _clean(value)


def _manifest_rows(spec: SourceSpec, path: str) -> Iterator[dict]:
    suffix = Path(path).suffix.lower()
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise SourceError(f"manifest {path}: {err}") from None
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        yield from pq.read_table(io.BytesIO(raw)).to_pylist()
    elif suffix in (".jsonl", ".json"):
        for _, row in _json_lines(spec, raw, path):
            yield row
    elif suffix in (".csv", ".tsv"):
        text = raw.decode("utf-8", errors="surrogateescape")  # bad bytes surface per row below
        for number, row in enumerate(csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ","), start=2):
            if any(_has_surrogates(v) for v in row.values() if isinstance(v, str)):
                spec.bad_records.append(f"{path}:{number}: not UTF-8")
                continue
            yield row
    else:
        raise SourceError(f"manifest {path}: unknown format {suffix!r}; use .jsonl, .csv, .tsv or .parquet")


def _json_lines(spec: SourceSpec, raw: bytes, path: str) -> Iterator[tuple[int, object]]:
    """(line number, value) of each JSON line; a line that does not parse is a bad record."""
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            spec.bad_records.append(f"{path}:{number}: {err}")


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _img2dataset(spec: SourceSpec) -> Iterator[Record]:
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


# ---------------------------------------------------------------------------- downstream tasks

def _json_list(data, key: str, path: str, what: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise SourceError(f"{what} {path}: expected a JSON object with a {key!r} list")
    return data[key]


def _vqa(spec: SourceSpec) -> Iterator[Record]:
    """VQA v2: one record per image, its questions as captions, their answers as targets."""
    questions_path, images = spec.require("questions", "images")
    data = _load_json(questions_path, "VQA questions")
    questions = _json_list(data, "questions", questions_path, "VQA questions")
    prefix = spec.options["prefix"] if "prefix" in spec.options else _coco_prefix(data, questions_path)
    answers = _vqa_answers(spec.options["annotations"]) if "annotations" in spec.options else None
    by_image: dict[int, list[tuple[str, dict]]] = {}
    for number, question in enumerate(questions):
        try:
            image_id, question_id, text = int(question["image_id"]), int(question["question_id"]), question["question"]
        except (KeyError, TypeError, ValueError) as err:
            raise SourceError(f"VQA questions {questions_path}: question {number} lacks a valid "
                              f"image_id, question_id or question ({type(err).__name__}: {err})") from None
        if answers is not None and question_id not in answers:
            raise SourceError(f"VQA annotations {spec.options['annotations']}: no answers for question_id "
                              f"{question_id} of {questions_path} (annotations of another split?)")
        target = {"question_id": question_id, "answers": answers[question_id] if answers is not None else []}
        by_image.setdefault(image_id, []).append((text, target))
    root = Path(images)
    for image_id, items in by_image.items():
        captions, targets = _clean_aligned([t for t, _ in items], [a for _, a in items])
        yield Record(spec.name, str(image_id), str(root / f"{prefix}{image_id:012d}.jpg"), captions, targets=targets)


def _coco_prefix(data: dict, path: str) -> str:
    """COCO's file-name prefix from a VQA file's data_subtype: test-dev2015 images are test2015's."""
    subtype, data_type = data.get("data_subtype"), data.get("data_type", "mscoco")
    if not isinstance(subtype, str) or not subtype or data_type != "mscoco":
        raise SourceError(f"VQA questions {path}: no mscoco data_subtype to name the image files by; "
                          f"give prefix= (e.g. prefix=COCO_train2014_)")
    if subtype.startswith("test-dev"):
        subtype = "test" + subtype[len("test-dev"):]
    return f"COCO_{subtype}_"


def _vqa_answers(path: str) -> dict[int, list[str]]:
    """question_id -> the raw annotator answers, in annotator order."""
    annotations = _json_list(_load_json(path, "VQA annotations"), "annotations", path, "VQA annotations")
    answers = {}
    for number, annotation in enumerate(annotations):
        try:
            texts = [a["answer"] for a in annotation["answers"]]
            question_id = int(annotation["question_id"])
        except (KeyError, TypeError, ValueError) as err:
            raise SourceError(f"VQA annotations {path}: annotation {number} lacks a valid question_id or "
                              f"answers[].answer ({type(err).__name__}: {err})") from None
        if not all(isinstance(t, str) for t in texts):
            raise SourceError(f"VQA annotations {path}: annotation {number} has a non-string answer")
        answers[question_id] = texts
    return answers


def _nlvr2(spec: SourceSpec) -> Iterator[Record]:
    """NLVR2 JSON lines: one record per image pair, its sentences as captions, labels as targets."""
    path, images = spec.require("path", "images")
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise SourceError(f"NLVR2 {path}: {err}") from None
    if raw.lstrip().startswith(b"["):
        raise SourceError(f"NLVR2 {path}: a JSON array; expected JSON lines as in the nlvr2 repository's data/")
    pairs: dict[str, list] = {}  # pair id -> [directory, [(sentence, target), ...]]
    for number, row in _json_lines(spec, raw, path):
        parsed = _nlvr2_row(row)
        if isinstance(parsed, str):
            spec.bad_records.append(f"{path}:{number}: {parsed}")
            continue
        pair, directory, sentence, target = parsed
        pairs.setdefault(pair, [directory, []])[1].append((sentence, target))
    root = Path(images)
    for pair, (directory, items) in pairs.items():
        folder = root / directory if directory is not None else root
        captions, targets = _clean_aligned([s for s, _ in items], [t for _, t in items])
        yield Record(spec.name, pair, str(folder / f"{pair}-img0.png"), captions, targets=targets,
                     image2=str(folder / f"{pair}-img1.png"))


def _nlvr2_row(row) -> tuple[str, str | None, str, dict] | str:
    """(pair id, image subfolder, sentence, target), or what is wrong with the line."""
    if not isinstance(row, dict):
        return "not a JSON object"
    identifier, label = row.get("identifier"), row.get("label")
    if not isinstance(identifier, str) or identifier.count("-") < 3:
        return f"identifier {identifier!r} is not split-set-pair-sentence"
    if label in ("True", "true", True):
        label = True
    elif label in ("False", "false", False):
        label = False
    else:
        return f"label {label!r} is not True or False"
    directory = row.get("directory")
    return (identifier.rsplit("-", 1)[0], None if directory in (None, "") else str(directory),
            row.get("sentence"), {"label": label, "identifier": identifier})


def _karpathy(spec: SourceSpec) -> Iterator[Record]:
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
            yield Record(spec.name, str(image_id), str(location), captions)
