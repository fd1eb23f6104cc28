"""VQA answers: the official evaluation's normalisation and the answer vocabulary.

    python -m data_pipeline.answers --annotations v2_mscoco_train2014_annotations.json \\
        v2_mscoco_val2014_annotations.json --top 3129 --out answers.json

`normalize_answer` is the one definition of "the same answer" in this project: the answer
vocabulary, training targets and the evaluation all go through it. It does what the official
VQA evaluation (vqaEval.py: processPunctuation, then processDigitArticle) does to an answer:

- newlines and tabs become spaces; leading and trailing blanks go;
- if the text holds a digit-comma-digit ("1,000"), every listed punctuation mark is deleted;
  otherwise a mark touching a space is deleted and any other becomes a space ("t-shirt" ->
  "t shirt", "yes!" -> "yes");
- a period not followed by a digit is deleted ("dog." -> "dog", "2.5" stays);
- lowercased; number words zero to ten become digits, "none" becomes "0";
- the articles a, an, the are dropped; contractions written without their apostrophe are
  restored ("dont" -> "don't").

The official script applies this to a prediction only when the annotators disagree; apply it
to both sides always, and the score is the same whenever annotators agree on a normalised form.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")
DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# The official map's entries that can match a lowercased word (its capitalised keys never do).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}


def normalize_answer(text: str) -> str:
    """An answer as the official VQA evaluation compares it (see the module docstring)."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    delete_all = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text  # tested on the text as given
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    out = PERIOD.sub("", out)
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def annotator_answers(annotation_paths: Iterable[str]) -> Iterable[str]:
    """Every annotator answer (10 per question) of VQA annotation files, raw."""
    for path in annotation_paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for annotation in data["annotations"]:
            for answer in annotation["answers"]:
                yield answer["answer"]


def build_answer_vocab(annotation_paths: Iterable[str], top: int = 3129) -> list[str]:
    """The `top` most frequent normalised answers, most frequent first, ties alphabetical."""
    counts = Counter(normalize_answer(a) for a in annotator_answers(annotation_paths))
    counts.pop("", None)  # an answer that normalises to nothing (e.g. "the") is no class
    return [answer for answer, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.answers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", nargs="+", required=True, help="VQA annotation JSON file(s)")
    parser.add_argument("--top", type=int, default=3129, help="answers kept (3129: the usual VQA v2 vocabulary)")
    parser.add_argument("--out", required=True, help="JSON file: a list of answers, most frequent first")
    args = parser.parse_args(argv)
    try:
        vocab = build_answer_vocab(args.annotations, args.top)
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"cannot read the annotations: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    print(f"wrote {len(vocab)} answers to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
