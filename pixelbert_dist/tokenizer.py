"""WordPiece tokenizer: load BERT's vocab, or train a small one from captions for tests and demos."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import BertTokenizer, PreTrainedTokenizerBase

from pixelbert_dist.config.errors import ConfigError
from pixelbert_dist.targets import SpecialTokens

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


MAKE_ONE = "python -m pixelbert_dist.tokenizer --captions CAPTIONS.json --out DIR (then --data.tokenizer=DIR)"


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """A hub name (`bert-base-uncased`), a folder with vocab.txt, or a vocab.txt file.

    One that cannot be loaded is a ConfigError naming what was tried and how to get one; never
    the 5-entry tokenizer transformers returns for a vocab it did not find (every word [UNK]).
    """
    path = Path(name_or_path)
    vocab_file = path / "vocab.txt" if path.is_dir() else path
    if vocab_file.is_file():
        missing = set(SPECIAL_TOKENS) - set(vocab_file.read_text(encoding="utf-8").split())
        if missing:
            # BertTokenizer would quietly append them, leaving a vocab that matches no model.
            raise ConfigError(f"{vocab_file}: lacks BERT's special tokens {sorted(missing)}; "
                              f"is it a WordPiece vocab.txt?")
    if path.is_file():
        # transformers 5 silently ignores BertTokenizer(vocab_file=...) and maps every
        # word to [UNK]; `vocab=` is the form that reads the file.
        tokenizer = BertTokenizer(vocab=str(path), do_lower_case=True)
    elif path.is_dir():
        if not any((path / name).is_file() for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json")):
            raise ConfigError(f"tokenizer {name_or_path}: the folder has no vocab.txt; make one with {MAKE_ONE}")
        tokenizer = BertTokenizer.from_pretrained(str(path))
    elif path.suffix or len(path.parts) > 2 or name_or_path.startswith((".", "/", "~")):
        raise ConfigError(f"tokenizer {name_or_path}: no such file or folder (from {Path.cwd()}); "
                          f"make one with {MAKE_ONE}")
    else:
        tokenizer = _from_hub(name_or_path)
    if len(tokenizer) <= len(SPECIAL_TOKENS):
        raise ConfigError(f"tokenizer {name_or_path}: loaded with only its {len(tokenizer)} special tokens "
                          f"(every word would be [UNK]); make one with {MAKE_ONE}")
    return tokenizer


def _from_hub(name: str) -> PreTrainedTokenizerBase:
    """From the local hub cache, else the hub when it can be reached: a machine without network
    is told so at once, not after minutes of retries."""
    import huggingface_hub.constants as hub

    tried = f"tried: a file or folder {name} (from {Path.cwd()}), the hub cache {hub.HF_HUB_CACHE}"
    try:
        tokenizer = BertTokenizer.from_pretrained(name, local_files_only=True)
        if len(tokenizer) > len(SPECIAL_TOKENS):
            return tokenizer
    except (OSError, ValueError):
        pass
    if hub.HF_HUB_OFFLINE:
        raise ConfigError(f"tokenizer {name}: not in the hub cache and HF_HUB_OFFLINE is set ({tried}); "
                          f"download it where there is network (hf download {name}), "
                          f"or make one with {MAKE_ONE}")
    if not _reachable(hub.ENDPOINT):
        raise ConfigError(f"tokenizer {name}: not in the hub cache and {hub.ENDPOINT} cannot be reached "
                          f"({tried}); download it where there is network (hf download {name}), "
                          f"or make one with {MAKE_ONE}")
    try:
        return BertTokenizer.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer {name}: {err} ({tried}, then {hub.ENDPOINT}); "
                          f"make one with {MAKE_ONE}") from None


def _reachable(endpoint: str, timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def train_wordpiece(captions: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a lower-cased WordPiece vocab on `captions`; return the written vocab.txt."""
    from tokenizers import BertWordPieceTokenizer

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(captions, vocab_size=vocab_size, min_frequency=1,  # no bar: it prints blank lines
                                special_tokens=SPECIAL_TOKENS, show_progress=False)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(out_dir))
    return out_dir / "vocab.txt"


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    return SpecialTokens(mask_id=tokenizer.mask_token_id, special_ids=tuple(tokenizer.all_special_ids),
                         vocab_size=len(tokenizer))


@dataclass
class EncodedCaptions:
    input_ids: Tensor       # (B, T) long, [CLS] ... [SEP] then [PAD]
    attention_mask: Tensor  # (B, T) long
    num_truncated: int      # captions cut to fit max_len


def encode_captions(tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], max_len: int,
                    keys: Sequence[str] | None = None) -> EncodedCaptions:
    """Tokenize to [CLS] caption [SEP], cut at `max_len` (counted), pad to the longest."""
    for i, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            name = keys[i] if keys is not None else f"index {i}"
            raise ValueError(f"caption of {name} is empty")
    rows = tokenizer(list(captions), add_special_tokens=True)["input_ids"]
    num_truncated = 0
    for i, row in enumerate(rows):
        if len(row) > max_len:
            rows[i] = row[: max_len - 1] + [tokenizer.sep_token_id]
            num_truncated += 1
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return EncodedCaptions(input_ids, attention_mask, num_truncated)


def main(argv: list[str] | None = None) -> int:
    """`python -m pixelbert_dist.tokenizer --captions COCO.json --out DIR [--vocab-size N]`."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m pixelbert_dist.tokenizer", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a WordPiece vocab on the captions of a COCO captions file.\n\n"
                    "    python -m pixelbert_dist.tokenizer --captions data/synthetic/annotations/captions.json "
                    "--out data/synthetic\n\nthen train with --data.tokenizer=data/synthetic/vocab.txt "
                    "(configs/pretrain/tiny-cpu.yaml's).")
    parser.add_argument("--captions", required=True, help="COCO-format captions JSON")
    parser.add_argument("--out", required=True, help="folder for vocab.txt")
    parser.add_argument("--vocab-size", type=int, default=1000)
    args = parser.parse_args(argv)
    captions = [a["caption"] for a in json.loads(Path(args.captions).read_text())["annotations"]]
    path = train_wordpiece(captions, args.vocab_size, args.out)
    print(f"{path}: {len(path.read_text().split())} entries")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
