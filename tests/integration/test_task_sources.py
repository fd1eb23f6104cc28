"""Downstream-task sources (VQA v2, NLVR2, Karpathy splits), answers, and synthetic tasks to shards.

Over 300 lines: the three task formats share the sample inputs and the sharding fixture.
"""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import shard, verify
from data_pipeline.answers import build_answer_vocab, normalize_answer
from data_pipeline.answers import main as answers_main
from data_pipeline.images import ImageSettings
from data_pipeline.shard_format import MANIFEST, read_samples
from data_pipeline.sources import Record, SourceError, SourceSpec, read_records
from data_pipeline.storage import open_storage
from data_pipeline.synthetic import COLORS
from data_pipeline.synthetic_tasks import generate_tasks
from tests import sample_inputs as inputs


def _records(spec: str) -> list[Record]:
    return list(read_records(SourceSpec.parse(spec)))


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _answers(*texts):
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


# ---------------------------------------------------------------------------- VQA

def test_vqa_one_record_per_image_with_questions_and_aligned_answers(tmp_path):
    questions = _write(tmp_path / "q.json", {"data_type": "mscoco", "data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "what color is it?", "question_id": 42000},
        {"image_id": 7, "question": "how many?", "question_id": 7000},
        {"image_id": 42, "question": "   ", "question_id": 42001},              # blank: dropped with its answers
        {"image_id": 42, "question": "what color is it?", "question_id": 42002},  # a repeat keeps its own answers
    ]})
    annotations = _write(tmp_path / "a.json", {"annotations": [
        {"question_id": q, "image_id": q // 1000, "answers": _answers(*[f"answer {q}"] * 9, "other"),
         "multiple_choice_answer": f"answer {q}"} for q in (42000, 7000, 42001, 42002)]})
    records = _records(f"vqa:questions={questions},annotations={annotations},images={tmp_path / 'val2014'}")
    assert [r.source_id for r in records] == ["42", "7"]
    first = records[0]
    assert first.key == "vqa_42" and first.image == str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    assert first.captions == ("what color is it?", "what color is it?")
    assert [t["question_id"] for t in first.targets] == [42000, 42002]
    assert first.targets[1]["answers"] == ["answer 42002"] * 9 + ["other"]
    # test-dev: no annotations, its images are test2015's; prefix= overrides
    test_dev = _write(tmp_path / "t.json", {"data_subtype": "test-dev2015", "questions": [
        {"image_id": 1, "question": "why?", "question_id": 1000}]})
    (record,) = _records(f"vqa:questions={test_dev},images=img")
    assert record.image == str(Path("img") / "COCO_test2015_000000000001.jpg")
    assert record.targets == ({"question_id": 1000, "answers": []},)
    (record,) = _records(f"vqa:questions={test_dev},images=img,prefix=")
    assert record.image == str(Path("img") / "000000000001.jpg")


def test_vqa_malformed_files_name_the_file_and_the_fault(tmp_path):
    no_list = _write(tmp_path / "no_list.json", {"data_subtype": "train2014", "question": []})
    with pytest.raises(SourceError, match=f"VQA questions {no_list}: expected a JSON object with a 'questions' list"):
        _records(f"vqa:questions={no_list},images=x")
    no_subtype = _write(tmp_path / "no_subtype.json", {"questions": []})
    with pytest.raises(SourceError, match=f"{no_subtype}: no mscoco data_subtype .* give prefix="):
        _records(f"vqa:questions={no_subtype},images=x")
    bad_question = _write(tmp_path / "bad_q.json", {"data_subtype": "train2014", "questions": [{"question": "x"}]})
    with pytest.raises(SourceError, match=f"{bad_question}: question 0 lacks a valid image_id"):
        _records(f"vqa:questions={bad_question},images=x")
    questions = _write(tmp_path / "q.json", {"data_subtype": "train2014", "questions": [
        {"image_id": 1, "question": "x?", "question_id": 1000}]})
    other_split = _write(tmp_path / "other.json", {"annotations": [{"question_id": 5, "answers": _answers("a")}]})
    with pytest.raises(SourceError, match=f"VQA annotations {other_split}: no answers for question_id 1000"):
        _records(f"vqa:questions={questions},annotations={other_split},images=x")
    truncated = _write(tmp_path / "truncated.json", '{"annotations": [')
    with pytest.raises(SourceError, match=f"VQA annotations {truncated}: not valid JSON"):
        _records(f"vqa:questions={questions},annotations={truncated},images=x")


# ---------------------------------------------------------------------------- NLVR2

def _nlvr2_line(identifier, sentence, label, directory=None):
    line = {"validation": {}, "sentence": sentence, "left_url": "http://x/l.jpg", "writer": "1", "label": label,
            "right_url": "http://x/r.jpg", "synset": "dog", "query": "dogs1", "identifier": identifier,
            "extra_validations": {}}
    if directory is not None:
        line["directory"] = directory
    return json.dumps(line)


def test_nlvr2_groups_sentences_by_pair_and_follows_the_image_naming_rule(tmp_path):
    lines = [_nlvr2_line("train-10171-0-0", "Two dogs.", "True", "46"),
             _nlvr2_line("train-10171-1-0", "Two dogs.", "False", "46"),
             "{not json",
             _nlvr2_line("train-10171-0-1", "One cat.", "False", "46"),
             _nlvr2_line("train-3-2-0", "Bad label.", "maybe", "3"),
             _nlvr2_line("dev-850-0-0", "Flat folder.", "True")]
    path = _write(tmp_path / "train.json", "\n".join(lines) + "\n")
    spec = SourceSpec.parse(f"nlvr2:path={path},images={tmp_path / 'images'}")
    records = list(read_records(spec))
    assert [r.key for r in records] == ["nlvr2_train-10171-0", "nlvr2_train-10171-1", "nlvr2_dev-850-0"]
    pair = records[0]
    assert pair.image == str(tmp_path / "images" / "46" / "train-10171-0-img0.png")
    assert pair.image2 == str(tmp_path / "images" / "46" / "train-10171-0-img1.png")
    assert pair.captions == ("Two dogs.", "One cat.")
    assert pair.targets == ({"label": True, "identifier": "train-10171-0-0"},
                            {"label": False, "identifier": "train-10171-0-1"})
    assert records[2].image == str(tmp_path / "images" / "dev-850-0-img0.png")  # no directory: no subfolder
    assert len(spec.bad_records) == 2
    assert f"{path}:3:" in spec.bad_records[0] and "label 'maybe'" in spec.bad_records[1]
    as_array = _write(tmp_path / "array.json", json.dumps([json.loads(lines[0])]))
    with pytest.raises(SourceError, match=f"NLVR2 {as_array}: a JSON array"):
        _records(f"nlvr2:path={as_array},images=x")
    with pytest.raises(SourceError, match=f"NLVR2 {tmp_path / 'absent.json'}"):
        _records(f"nlvr2:path={tmp_path / 'absent.json'},images=x")


def test_a_pair_with_a_bad_right_image_is_skipped_and_counted(tmp_path):
    (tmp_path / "img").mkdir()
    for name, data in (("p-1-0-img0.png", inputs.png_with_alpha()), ("p-1-0-img1.png", inputs.jpeg(50, 40)),
                       ("p-2-0-img0.png", inputs.jpeg())):
        (tmp_path / "img" / name).write_bytes(data)
    records = [Record("nlvr2", stem, str(tmp_path / "img" / f"{stem}-img0.png"), ("s",),
                      targets=({"label": True, "identifier": f"{stem}-0"},),
                      image2=str(tmp_path / "img" / f"{stem}-img1.png")) for stem in ("p-1-0", "p-2-0")]
    result = shard.build_shard(0, records, ImageSettings(), open_storage(str(tmp_path / "out")))
    assert result.written == {"nlvr2": 1} and result.skipped == {"nlvr2": {"missing_file": 1}}
    assert result.skipped_examples[0]["image"].endswith("p-2-0-img1.png")
    with open(tmp_path / "out" / result.name, "rb") as f:
        ((entry, members),) = list(read_samples(f))
    assert [m.ext for m in entry.members] == ["jpg", "right.jpg", "txt", "json"]
    meta = json.loads(members["json"])
    assert meta["targets"] == [{"label": True, "identifier": "p-1-0-0"}]
    assert (meta["width2"], meta["height2"]) == (50, 40) and members["right.jpg"] == inputs.jpeg(50, 40)


# ---------------------------------------------------------------------------- Karpathy

def test_karpathy_splits_paths_and_ids(tmp_path):
    coco = _write(tmp_path / "dataset_coco.json", {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test", "imgid": 0,
         "cocoid": 391895, "sentences": [{"raw": "A man riding.", "tokens": ["a"]}, {"raw": "A man riding."}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "train", "imgid": 1,
         "cocoid": 9, "sentences": [{"raw": "Food."}]},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "restval", "imgid": 2,
         "cocoid": 42, "sentences": [{"raw": "Laundry."}]}]})
    records = _records(f"karpathy:path={coco},images={tmp_path},split=train+restval")
    assert [(r.source_id, r.image, r.captions) for r in records] == [
        ("9", str(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg"), ("Food.",)),
        ("42", str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"), ("Laundry.",))]
    (test,) = _records(f"karpathy:path={coco},images={tmp_path},split=test")
    assert test.captions == ("A man riding.",)
    flickr = _write(tmp_path / "dataset_flickr30k.json", {"images": [
        {"filename": "1000092795.jpg", "split": "test", "imgid": 7, "sentences": [{"raw": "Two young guys."}]}]})
    (record,) = _records(f"karpathy:path={flickr},images={tmp_path / 'flickr'},split=test")
    assert (record.source_id, record.image) == ("7", str(tmp_path / "flickr" / "1000092795.jpg"))
    with pytest.raises(SourceError, match="split 'train\\+rest'"):
        _records(f"karpathy:path={flickr},images=x,split=train+rest")
    broken = _write(tmp_path / "broken.json", {"images": [{"split": "test", "imgid": 1, "sentences": []}]})
    with pytest.raises(SourceError, match=f"Karpathy split {broken}: image 0 lacks a valid .*filename"):
        _records(f"karpathy:path={broken},images=x,split=test")


# ---------------------------------------------------------------------------- answers

@pytest.mark.parametrize("raw, normalized", [
    ("Two", "2"), ("the dog.", "dog"), ("yes!", "yes"), ("1,000", "1000"), ("dont", "don't"),
    ("t-shirt", "t shirt"), ("3.5", "3.5"), (" a  Red\tcar\n", "red car"), ("none", "0"), ("hi, there", "hi there"),
    ("left/right", "left right"), ("10:30", "10:30"), ("one, two", "1 2"), ("1,000 (approx)!", "1000 approx"),
    ("isnt it", "isn't it"), ("An apple", "apple"),
])
def test_normalize_answer_follows_the_official_vqa_evaluation(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_answer_vocab_counts_every_annotator_most_frequent_first_ties_alphabetical(tmp_path):
    first = _write(tmp_path / "a.json", {"annotations": [
        {"question_id": 1,
         "answers": _answers("yes", "Yes", "yes!", "two", "2", "red", "blue", "the", "Red", "red.")}]})
    second = _write(tmp_path / "b.json",
                    {"annotations": [{"question_id": 2, "answers": _answers("yes", "yes", "Two")}]})
    assert build_answer_vocab([str(first), str(second)], top=3) == ["yes", "2", "red"]
    assert build_answer_vocab([str(first), str(second)]) == ["yes", "2", "red", "blue"]  # "the" is empty: no class
    out = tmp_path / "answers.json"
    assert answers_main(["--annotations", str(first), str(second), "--top", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == ["yes", "2"]


# ---------------------------------------------------------------------------- synthetic tasks end to end

@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return root, generate_tasks(root, 30, seed=0, min_side=64, max_side=128)


def test_synthetic_vqa_answers_fit_the_pixels_and_are_balanced(tasks):
    root, _ = tasks
    vqa = root / "vqa"
    questions = json.loads((vqa / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]
    annotations = json.loads((vqa / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    assert 3 * 24 <= len(questions) == len(annotations) <= 5 * 24
    answers = {a["question_id"]: a for a in annotations}
    yes_no = []
    for question in questions:
        annotation = answers[question["question_id"]]
        truth = annotation["multiple_choice_answer"]
        assert len(annotation["answers"]) == 10
        assert sum(normalize_answer(a["answer"]) == truth for a in annotation["answers"]) >= 8
        words = question["question"].rstrip("?").split()
        color = next((w for w in words if w in COLORS), truth if truth in COLORS else None)
        if color and truth != "no":  # the colour asked about, or answered, is in the image
            image = Image.open(vqa / "train2014" / f"COCO_train2014_{question['image_id']:012d}.jpg")
            pixels = np.asarray(image).reshape(-1, 3).astype(int)
            assert (np.abs(pixels - np.array(COLORS[color])).sum(axis=1) < 60).sum() > 20, (question, truth)
        if annotation["answer_type"] == "yes/no":
            yes_no.append(truth)
    assert 0.25 < yes_no.count("yes") / len(yes_no) < 0.75
    assert set(json.loads((vqa / "answers.json").read_text())) >= {"yes", "no", "1", "2", "3", "left", "right"}


def test_synthetic_nlvr2_sentences_are_true_for_half_their_pairs(tasks):
    root, specs = tasks
    lines = [json.loads(line) for line in (root / "nlvr2" / "train.json").read_text().splitlines()]
    by_sentence = {}
    for line in lines:
        set_id = line["identifier"].split("-")[1]
        by_sentence.setdefault((set_id, line["sentence"]), []).append(line["label"])
    assert all(sorted(labels) == ["False", "False", "True", "True"] for labels in by_sentence.values())
    assert all("directory" in line for line in lines)
    records = _records(specs["nlvr2"][0])
    assert len(records) == 4 * 2 and all(Path(r.image).is_file() and Path(r.image2).is_file() for r in records)
    (retrieval_test,) = [s for s in specs["retrieval"] if s.endswith("split=test")]
    assert [len(r.captions) for r in _records(retrieval_test)] == [5, 5, 5]


def test_synthetic_tasks_shard_and_read_back_with_aligned_targets(tasks, tmp_path, ray_local):
    root, specs = tasks
    out = tmp_path / "shards"
    argv = [a for spec in specs["vqa"] + specs["nlvr2"] for a in ("--source", spec)]
    assert shard.main([*argv, "--out", str(out), "--shard-size", "16", "--no-progress"]) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["stats"]["skipped"] == {}
    assert manifest["stats"]["written"] == {"vqa_train": 24, "vqa_val": 6, "nlvr2_train": 8, "nlvr2_dev": 4}
    vqa_questions = {q["question_id"]: q["question"] for split in ("train2014", "val2014") for q in json.loads(
        (root / "vqa" / f"v2_OpenEnded_mscoco_{split}_questions.json").read_text())["questions"]}
    nlvr2_lines = {line["identifier"]: line for split in ("train", "dev")
                   for line in map(json.loads, (root / "nlvr2" / f"{split}.json").read_text().splitlines())}
    seen = 0
    for tar in sorted(out.glob("*.tar")):
        with open(tar, "rb") as f:
            for entry, members in read_samples(f):
                meta = json.loads(members["json"])
                assert len(meta["targets"]) == len(meta["captions"]) > 0
                if meta["source"].startswith("vqa"):
                    assert "right.jpg" not in members
                    assert [vqa_questions[t["question_id"]] for t in meta["targets"]] == meta["captions"]
                else:
                    assert [m.ext for m in entry.members] == ["jpg", "right.jpg", "txt", "json"]
                    right = Image.open(io.BytesIO(members["right.jpg"]))
                    right.load()
                    assert right.size == (meta["width2"], meta["height2"])
                    for caption, target in zip(meta["captions"], meta["targets"]):
                        line = nlvr2_lines[target["identifier"]]
                        assert (line["sentence"], line["label"]) == (caption, str(target["label"]))
                        assert target["identifier"].rsplit("-", 1)[0] == meta["source_id"]
                seen += 1
    assert seen == manifest["num_samples"] == 42
    assert verify.main([str(out)]) == 0
    wds2idx = Path(sys.executable).with_name("wds2idx")  # our index of a pair shard is what DALI's tool writes
    for entry in manifest["shards"]:
        theirs = tmp_path / "theirs.idx"
        subprocess.run([str(wds2idx), str(out / entry["name"]), str(theirs)], check=True, capture_output=True)
        assert (out / entry["index"]).read_text() == theirs.read_text()


def test_dali_reads_both_images_of_a_pair_with_our_index(tasks, tmp_path):
    from nvidia.dali import fn, pipeline_def

    _, specs = tasks
    records = _records(specs["nlvr2"][0])
    result = shard.build_shard(0, records, ImageSettings(), open_storage(str(tmp_path)))

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def read():
        left, right, meta = fn.readers.webdataset(paths=[str(tmp_path / result.name)],
                                                  index_paths=[str(tmp_path / result.index_file)],
                                                  ext=["jpg", "right.jpg", "json"], missing_component_behavior="error")
        return fn.decoders.image(left, device="cpu"), fn.decoders.image(right, device="cpu"), meta

    pipe = read()
    pipe.build()
    for _ in range(len(records) // 4):
        left, right, meta = pipe.run()
        for i in range(len(meta)):
            info = json.loads(bytes(meta.at(i)))
            assert left.at(i).shape[:2] == (info["height"], info["width"])
            assert right.at(i).shape[:2] == (info["height2"], info["width2"])
