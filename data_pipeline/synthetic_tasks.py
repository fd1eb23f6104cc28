"""Synthetic downstream tasks from the shapes world, each in its real dataset's file format.

    python -m data_pipeline.synthetic_tasks --out data/tasks --num-images 300 --seed 0

Writes, from new images (a seed namespace of their own, so none is a pretraining image):

- DIR/vqa/: VQA v2 layout. train2014/ and val2014/ hold COCO_{split}_{id:012d}.jpg;
  v2_OpenEnded_mscoco_{split}_questions.json and v2_mscoco_{split}_annotations.json hold
  3-5 questions per image about colours, shapes, counts, positions and presence, each with
  10 annotator answers (now and then one or two wrong, or written differently: "Two", "the
  left"), and answers.json the answer vocabulary of the train annotations. Every question
  form's answers are balanced (yes/no half each; a colour as likely as any other), so only
  the image tells the answer.
- DIR/nlvr2/: NLVR2 layout. train.json and dev.json (JSON lines), images/train/DIR/ and
  dev/ holding {split}-{set}-{pair}-img0.png and -img1.png. As in NLVR2, a sentence is
  written for a set of four pairs: true for two, false for two, so a sentence alone says
  nothing; each pair has 2-3 sentences that need both images ("exactly one image contains
  a triangle").
- DIR/retrieval/: dataset_synthetic.json in Karpathy's (Flickr) format, splits train, val
  and test, the synthetic captions; images/N.jpg.

`--num-images` is per task (NLVR2 rounds down to whole sets of 4 pairs: 8 images each).
Prints the `--source` specs that `python -m data_pipeline.shard` takes for each split.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

from data_pipeline.answers import build_answer_vocab
from data_pipeline.synthetic import COLORS, NUMBERS, SHAPES, Scene, captions_for, make_scene

TRAIN_FRACTION = 0.8
NOISY_QUESTION_RATE = 0.2    # questions where 1-2 annotators answer wrongly
VARIANT_RATE = 0.2           # questions where one annotator writes the answer another way
SIDES = ("left", "right", "top", "bottom")


def _scene(seed: int, task: str, index: int, min_side: int, max_side: int) -> tuple[Scene, random.Random]:
    """A new image per (task, index), and the stream that goes on to draw its texts."""
    rng = random.Random(f"tasks-{seed}-{task}-{index}")  # pretraining images use f"{seed}-{id}"
    return make_scene(rng, min_side, max_side), rng


def count(scene: Scene, shape: str | None = None, color: str | None = None) -> int:
    """How many shapes of that shape and/or colour the image holds."""
    return sum(g.count for g in (scene.a, scene.b)
               if (shape is None or g.shape == shape) and (color is None or g.color == color))


# ---------------------------------------------------------------------------- VQA

def _noun(group) -> tuple[str, str]:
    """('is', 'circle') or ('are', 'circles')."""
    return ("is", group.shape) if group.count == 1 else ("are", group.shape + "s")


def vqa_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """3-5 (question, answer, answer_type, question_type), each kind at most once."""
    placed = list(zip((scene.a, scene.b), scene.sides))
    questions = []
    for kind in rng.sample(("color", "shape", "count", "where", "exists"), rng.randint(3, 5)):
        group, side = rng.choice(placed)
        verb, noun = _noun(group)
        if kind == "color":
            questions.append((f"what color {verb} the {noun} on the {side}?", group.color, "other",
                              "what color is the"))
        elif kind == "shape":
            questions.append((f"what shape is on the {side}?", group.shape, "other", "what shape is"))
        elif kind == "count":
            questions.append((f"how many {group.color} {group.shape}s are there?", str(group.count), "number",
                              "how many"))
        elif kind == "where":
            questions.append((f"where {verb} the {group.color} {noun}?", side, "other", "where is the"))
        else:  # yes or no, half each; the asked colour+shape is uniform either way
            present = {(g.color, g.shape) for g in (scene.a, scene.b)}
            if rng.random() < 0.5:
                color, shape, answer = group.color, group.shape, "yes"
            else:
                color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
                answer = "no"
            questions.append((f"is there a {color} {shape}?", answer, "yes/no", "is there a"))
    return questions


def _answer_space(answer: str) -> tuple[str, ...]:
    for space in (tuple(COLORS), SHAPES, ("1", "2", "3"), SIDES, ("yes", "no")):
        if answer in space:
            return space
    raise ValueError(answer)


def _variant(answer: str, rng: random.Random) -> str:
    """The same answer written another way; `normalize_answer` maps it back."""
    if answer.isdigit():
        return NUMBERS[int(answer)].capitalize()
    if answer in ("yes", "no"):
        return rng.choice((answer.capitalize(), f"{answer}!", f"{answer}."))
    return rng.choice((answer.capitalize(), f"the {answer}", f"{answer}."))


def annotator_answers(truth: str, rng: random.Random) -> list[str]:
    """10 answers: the truth, now and then 1-2 wrong ones or one written differently."""
    answers = [truth] * 10
    if rng.random() < NOISY_QUESTION_RATE:
        wrong = [a for a in _answer_space(truth) if a != truth]
        for i in rng.sample(range(10), rng.randint(1, 2)):
            answers[i] = rng.choice(wrong)
    if rng.random() < VARIANT_RATE:
        i = rng.choice([i for i, a in enumerate(answers) if a == truth])
        answers[i] = _variant(truth, rng)
    return answers


def write_vqa(out: Path, num_images: int, seed: int, min_side: int, max_side: int) -> list[str]:
    """VQA v2 files for train2014 and val2014; returns their source specs."""
    num_train = max(1, round(num_images * TRAIN_FRACTION))
    splits = {"train2014": range(1, num_train + 1), "val2014": range(num_train + 1, num_images + 1)}
    specs = []
    for split, image_ids in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        questions, annotations = [], []
        for image_id in image_ids:
            scene, rng = _scene(seed, "vqa", image_id, min_side, max_side)
            scene.image.save(out / split / f"COCO_{split}_{image_id:012d}.jpg", quality=90)
            for k, (question, truth, answer_type, question_type) in enumerate(vqa_questions(scene, rng)):
                question_id = image_id * 1000 + k  # VQA's own numbering
                questions.append({"image_id": image_id, "question": question, "question_id": question_id})
                annotations.append({
                    "question_type": question_type, "multiple_choice_answer": truth,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                for i, a in enumerate(annotator_answers(truth, rng))],
                    "image_id": image_id, "answer_type": answer_type, "question_id": question_id})
        header = {"info": {"description": "pixelbert-dist synthetic VQA", "seed": seed}, "license": {},
                  "data_type": "mscoco", "data_subtype": split}
        questions_path = out / f"v2_OpenEnded_mscoco_{split}_questions.json"
        annotations_path = out / f"v2_mscoco_{split}_annotations.json"
        questions_path.write_text(json.dumps({**header, "task_type": "Open-Ended", "questions": questions}))
        annotations_path.write_text(json.dumps({**header, "annotations": annotations}))
        specs.append(f"vqa:name=vqa_{split[:-4]},questions={questions_path},annotations={annotations_path},"
                     f"images={out / split}")
    vocab = build_answer_vocab([str(out / "v2_mscoco_train2014_annotations.json")])
    (out / "answers.json").write_text(json.dumps(vocab))
    return specs


# ---------------------------------------------------------------------------- NLVR2

Truth = Callable[[Scene, Scene, object], bool]
STATEMENTS: tuple[tuple[str, tuple, Truth], ...] = (  # sentence, its parameter's values, truth(left, right, value)
    ("the left image has more {}s than the right image", SHAPES, lambda l, r, s: count(l, s) > count(r, s)),
    ("the right image has more {}s than the left image", SHAPES, lambda l, r, s: count(r, s) > count(l, s)),
    ("exactly one image contains a {}", SHAPES, lambda l, r, s: (count(l, s) > 0) != (count(r, s) > 0)),
    ("both images contain a {}", SHAPES, lambda l, r, s: count(l, s) > 0 and count(r, s) > 0),
    ("both images contain a {} shape", tuple(COLORS),
     lambda l, r, c: count(l, color=c) > 0 and count(r, color=c) > 0),
    ("neither image contains a {} shape", tuple(COLORS),
     lambda l, r, c: count(l, color=c) == 0 and count(r, color=c) == 0),
    ("the left image has more shapes than the right image", (None,), lambda l, r, _: count(l) > count(r)),
)
MAX_TRIES = 5000  # pairs drawn to meet a set's labels; ~50 are needed at worst on average


def _nlvr2_set(seed: int, split: str, set_id: int, min_side: int, max_side: int):
    """2-3 sentences and 4 image pairs; each sentence true for 2 pairs and false for 2."""
    rng = random.Random(f"tasks-{seed}-nlvr2-{split}-{set_id}")
    while True:
        chosen, used, size = [], set(), rng.choice((2, 3))  # different values: none contradicts another
        for template, values, truth in rng.sample(STATEMENTS, len(STATEMENTS)):
            value = rng.choice(values)
            if value not in used and len(chosen) < size:
                used.add(value)
                chosen.append((template.format(value) if value else template, value, truth))
        columns = [rng.sample([True, True, False, False], 4) for _ in chosen]
        pairs, draw = [], 0
        for pair_id in range(4):
            wanted = [column[pair_id] for column in columns]
            for _ in range(MAX_TRIES):
                draw += 1
                left, _ = _scene(seed, f"nlvr2-{split}-{set_id}-left", draw, min_side, max_side)
                right, _ = _scene(seed, f"nlvr2-{split}-{set_id}-right", draw, min_side, max_side)
                if [truth(left, right, value) for _, value, truth in chosen] == wanted:
                    pairs.append((left, right, [(sentence, w) for (sentence, _, _), w in zip(chosen, wanted)]))
                    break
            else:
                break  # these sentences rarely fit together: draw others
        if len(pairs) == 4:
            return pairs


def write_nlvr2(out: Path, num_images: int, seed: int, min_side: int, max_side: int) -> list[str]:
    """NLVR2 JSON lines and image pairs for train and dev; returns their source specs."""
    num_sets = max(2, num_images // 8)
    num_dev = max(1, round(num_sets * (1 - TRAIN_FRACTION)))
    specs = []
    for split, sets, images in (("train", num_sets - num_dev, out / "images" / "train"), ("dev", num_dev, out / "dev")):
        lines = []
        for set_id in range(sets):
            directory = str(set_id % 10) if split == "train" else None  # NLVR2 spreads train over folders
            folder = images / directory if directory else images
            folder.mkdir(parents=True, exist_ok=True)
            for pair_id, (left, right, sentences) in enumerate(_nlvr2_set(seed, split, set_id, min_side, max_side)):
                stem = f"{split}-{set_id}-{pair_id}"
                left.image.save(folder / f"{stem}-img0.png")
                right.image.save(folder / f"{stem}-img1.png")
                for sentence_id, (sentence, label) in enumerate(sentences):
                    line = {"validation": {}, "sentence": sentence, "left_url": f"synthetic://{stem}-img0.png",
                            "writer": "0", "label": str(label), "right_url": f"synthetic://{stem}-img1.png",
                            "synset": "shape", "query": f"shapes{set_id}", "identifier": f"{stem}-{sentence_id}",
                            "extra_validations": {}}
                    if directory:
                        line["directory"] = directory
                    lines.append(json.dumps(line))
        path = out / f"{split}.json"
        path.write_text("".join(line + "\n" for line in lines))
        specs.append(f"nlvr2:name=nlvr2_{split},path={path},images={images}")
    return specs


# ---------------------------------------------------------------------------- retrieval

def write_retrieval(out: Path, num_images: int, seed: int, min_side: int, max_side: int) -> list[str]:
    """Karpathy-format (Flickr style) split file and images; returns the specs of its splits."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    num_train = round(num_images * TRAIN_FRACTION)
    num_val = (num_images - num_train) // 2
    entries, sentid = [], 0
    for imgid in range(num_images):
        scene, _ = _scene(seed, "retrieval", imgid, min_side, max_side)
        filename = f"{imgid + 1}.jpg"
        scene.image.save(out / "images" / filename, quality=90)
        sentences = []
        for caption in captions_for(scene.a, scene.b, scene.relation):
            sentences.append({"tokens": caption.split(), "raw": caption, "imgid": imgid, "sentid": sentid})
            sentid += 1
        split = "train" if imgid < num_train else "val" if imgid < num_train + num_val else "test"
        entries.append({"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences,
                        "split": split, "filename": filename})
    path = out / "dataset_synthetic.json"
    path.write_text(json.dumps({"images": entries, "dataset": "synthetic"}))
    return [f"karpathy:name=retrieval_{split},path={path},images={out / 'images'},split={split}"
            for split in ("train", "val", "test")]


def generate_tasks(out: str | Path, num_images: int, seed: int, min_side: int = 192,
                   max_side: int = 448) -> dict[str, list[str]]:
    """Write all three tasks under `out`; returns each task's source specs."""
    out = Path(out)
    return {"vqa": write_vqa(out / "vqa", num_images, seed, min_side, max_side),
            "nlvr2": write_nlvr2(out / "nlvr2", num_images, seed, min_side, max_side),
            "retrieval": write_retrieval(out / "retrieval", num_images, seed, min_side, max_side)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.synthetic_tasks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-images", type=int, required=True, help="images per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-side", type=int, default=192)
    parser.add_argument("--max-side", type=int, default=448)
    args = parser.parse_args(argv)
    if args.num_images < 2:
        parser.error("--num-images must be at least 2")
    specs = generate_tasks(args.out, args.num_images, args.seed, args.min_side, args.max_side)
    print(f"wrote VQA, NLVR2 and retrieval data to {args.out}; source specs for python -m data_pipeline.shard:")
    for task, task_specs in specs.items():
        for spec in task_specs:
            print(f"  {task}: --source {spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
