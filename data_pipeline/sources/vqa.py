"""VQA v2: a questions JSON (+ optional annotations JSON) over COCO images named {prefix}{image_id:012d}.jpg.

    vqa:questions=v2_OpenEnded_mscoco_train2014_questions.json,annotations=v2_mscoco_train2014_annotations.json,images=train2014[,prefix=COCO_train2014_]

One record per image, its questions as captions, targets `{"question_id", "answers"}` (the
10 raw annotator answers; [] without `annotations`, as for test-dev). The prefix defaults to
COCO's from the questions file's `data_subtype` (`test-dev2015` -> `COCO_test2015_`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_pipeline.sources.common import _clean_aligned, _json_list, _load_json
from data_pipeline.sources.types import Record, SourceError, SourceSpec, reader


@reader("vqa")
def read(spec: SourceSpec) -> Iterator[Record]:
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
        yield Record(spec.name, str(image_id), str(root / f"{prefix}{image_id:012d}.jpg"), captions, targets=targets,
                     root=images)


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
