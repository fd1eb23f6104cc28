"""Hostile manifests and sample tables: `verify` and the loader (what `pretrain` reads through)
refuse or skip them by the same code, in the same words. The helpers here that copy the
dataset and edit its tars, manifest and tables also serve test_faults_damage.py, where
damaged tars cost their pairs and not the run.

A manifest that points outside its dataset is refused before any shard is opened; a shard
whose table lies is skipped whole (data/skipped/bad_table) by the loader and reported by
verify. Each test records its row of the fault table (tests/faults.py) before asserting.
"""

import json
import logging
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from data_pipeline import verify
from data_pipeline.sample_table import digest, encode_table, table_name
from data_pipeline.shard_format import MANIFEST, ShardFormatError, unsafe_member
from pixelbert_dist.config import load_config
from pixelbert_dist.data.loader import StreamingLoader
from pixelbert_dist.data.plan import Manifest, ManifestError
from tests.datasets import synthetic_shards
from tests.conftest import TINY
from tests.faults import record_fault
from tests.launch import job_command, job_env


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local):
    """3 local shards of 4 images (5 captions each) and a loader config for them."""
    out, vocab = synthetic_shards(tmp_path_factory.mktemp("faults-data"), 12, seed=3, shard_size=4)
    cfg = load_config(TINY, [f"--data.tokenizer={vocab}", "--data.image_short_side=128",
                             "--data.image_long_side=192"])
    return out, cfg


def _copy(dataset, tmp_path) -> tuple[Path, dict]:
    """A copy of the dataset and its manifest, each shard's sample table read into the entry's
    `samples` (as a v1 manifest held them) so a test can edit them; `_save` writes them back."""
    copy = tmp_path / "shards"
    shutil.copytree(dataset[0], copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    for entry in manifest["shards"]:
        table = Manifest(str(copy)).table(entry["name"])
        entry["samples"] = [table.entry(i) for i in range(len(table))]
    return copy, manifest


def _save(copy: Path, manifest: dict) -> None:
    """The manifest with each shard's (edited) samples as its table, sha256 and counts updated to
    match: only the checks of the rows themselves can catch an edit."""
    manifest = json.loads(json.dumps(manifest))
    for entry in manifest["shards"]:
        samples = entry.pop("samples")
        if unsafe_member(entry["name"]) or ":" in entry["name"]:
            continue  # a hostile name: refused before any table is looked for
        table = encode_table(samples)
        (copy / table_name(entry["name"])).write_bytes(table)
        entry.update(num_samples=len(samples), num_captions=sum(s["captions"] for s in samples),
                     table_bytes=len(table), table_sha256=digest(table))
    (copy / MANIFEST).write_text(json.dumps(manifest))


def _members(path: Path) -> dict[str, int]:
    """Member name -> offset of its header."""
    with tarfile.open(path) as tar:
        return {info.name: info.offset for info in tar}


def _patch_header(path: Path, header_at: int, name: str | None = None, size: int | None = None,
                  kind: bytes | None = None, link: str | None = None, checksum: bool = True) -> None:
    """Rewrite fields of the ustar header at `header_at` in place (same file size)."""
    data = bytearray(path.read_bytes())
    header = data[header_at:header_at + 512]
    if name is not None:
        header[0:100] = name.encode().ljust(100, b"\0")
    if size is not None:
        header[124:136] = f"{size:011o}".encode() + b"\0"
    if kind is not None:
        header[156:157] = kind
    if link is not None:
        header[157:257] = link.encode().ljust(100, b"\0")
    if checksum:
        header[148:156] = b" " * 8
        header[148:156] = f"{sum(header):06o}".encode() + b"\0 "
    else:
        header[0] ^= 0x01  # one flipped bit: the stored checksum no longer matches
    data[header_at:header_at + 512] = header
    path.write_bytes(bytes(data))


def _conclude(row: dict, checks: dict[str, bool]) -> None:
    """Record the fault row with the test's verdict, then fail on the first check that did not hold."""
    failed = [name for name, ok in checks.items() if not ok]
    record_fault({**row, "passed": not failed})
    assert not failed, f"failed checks: {failed}"


def _files(*roots: Path) -> set[str]:
    return {str(p) for root in roots for p in root.rglob("*")}


MANIFEST_CASES = ["parent", "absolute", "s3", "url_on_shards", "url_elsewhere", "not_json", "no_shard_list",
                  "unknown_format"]
TABLE_CASES = ["past_end", "overlap", "huge_size", "unaligned", "many_captions", "table_changed", "table_missing",
               "table_cut"]


def _hostile(copy: Path, manifest: dict, outside: Path, fault: str) -> tuple[str, str]:
    """Make `fault` in the copy's manifest or a table (written); (what was done, text the message must hold)."""
    entry = manifest["shards"][1]
    sample = entry["samples"][1]
    name = entry["name"]
    done, expected = f"sample {sample['key']}: {fault}", f"shard {name!r}: sample {sample['key']!r} at offset "
    if fault in ("parent", "absolute", "s3"):
        new = {"parent": "../other/000001.tar", "absolute": str(outside), "s3": "s3://other-bucket/000001.tar"}[fault]
        entry["name"] = new
        done, expected = f"shard name {name} -> {new} (a readable copy of the shard lies there)", \
            f"shard {new!r}: a shard name"
    elif fault == "url_on_shards":
        entry["url"] = f"s3://other-bucket/{name}"
        done, expected = f"a sharding-job manifest's shard given url s3://other-bucket/{name}", f"shard {name!r}: url"
    elif fault == "url_elsewhere":
        entry.update(layout="img2dataset", url=f"{outside.parent}/../../x/{name}")
        done, expected = "an index manifest's shard url with '..'", f"shard {name!r}: url"
    elif fault == "no_shard_list":
        done, expected = "`shards` an object, not a list", "no list of shards"
    elif fault == "unknown_format":
        manifest["format"] = "pixelbert-dist/webdataset-v9"
        done, expected = "format webdataset-v9", "format 'pixelbert-dist/webdataset-v9' is not one this version reads"
    elif fault == "past_end":
        sample["offset"] = entry["bytes"]
    elif fault == "overlap":
        sample["offset"] = entry["samples"][0]["offset"] + 512
    elif fault == "huge_size":
        sample["size"] = 2 ** 31
    elif fault == "unaligned":
        sample["offset"] += 1
    elif fault == "many_captions":
        sample["captions"] = 10_001
        done = f"sample {sample['key']} lists 10,001 captions"
        expected = f"shard {name!r}: sample {sample['key']!r} lists"
    _save(copy, manifest)
    if fault == "no_shard_list":
        written = json.loads((copy / MANIFEST).read_text())
        (copy / MANIFEST).write_text(json.dumps({**written, "shards": {s["name"]: s for s in written["shards"]}}))
    if fault in ("past_end", "overlap", "huge_size", "unaligned"):
        done = f"{done} ({sample['offset']}, {sample['size']} bytes)"
        expected += str(sample["offset"])
    table = copy / table_name(name)
    if fault == "not_json":
        text = (copy / MANIFEST).read_text()
        (copy / MANIFEST).write_text(text[:len(text) // 2])
        done, expected = "manifest.json cut in half", "is not JSON (cut short, or not a manifest)"
    elif fault == "table_changed":  # one offset byte flipped; the manifest's sha256 still names the old table
        data = table.read_bytes()
        table.write_bytes(data[:-20] + bytes([data[-20] ^ 1]) + data[-19:])
        done, expected = f"one byte of {table.name} flipped", "does not hash to the manifest's sha256"
    elif fault == "table_missing":
        table.unlink()
        done, expected = f"{table.name} deleted", "its sample table cannot be read"
    elif fault == "table_cut":
        table.write_bytes(table.read_bytes()[:100])
        done, expected = f"{table.name} cut to 100 bytes", f"shard {name!r}: its sample table"
    return done, expected


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", MANIFEST_CASES + TABLE_CASES)
def test_verify_and_the_loader_say_the_same_of_a_hostile_manifest_or_table(dataset, tmp_path, fault, caplog):
    copy, manifest = _copy(dataset, tmp_path)
    (tmp_path / "other").mkdir()
    outside = tmp_path / "other" / "000001.tar"
    shutil.copy(copy / "000001.tar", outside)  # it would read fine: only the name is wrong
    name = manifest["shards"][1]["name"]
    done, expected = _hostile(copy, manifest, outside, fault)
    in_table = fault in TABLE_CASES
    caplog.set_level(logging.WARNING, logger="pixelbert_dist.data")
    try:  # names and urls are refused when the manifest is read; a table's shard is skipped whole
        loader = StreamingLoader(str(copy), dataset[1].data, 4, num_workers=0, seed=1)
        pairs = [p for _, info in loader.epoch_batches() for p in info.pairs]
        said, refused = loader.damaged.get(name, {}).get("first", ""), None
    except ManifestError as err:
        pairs, said, refused = [], str(err), err
    _, problems = verify.verify(str(copy))
    named = f"{copy}/{table_name(name)}" if in_table else f"{copy}/{MANIFEST}"
    _conclude(dict(fault=f"hostile {'sample table' if in_table else 'manifest'} ({fault.replace('_', ' ')})",
                   what_was_done=done,
                   expected=("the loader skips the shard whole (bad_table), naming table, shard and sample; "
                             if in_table else "the loader refuses the manifest before any shard is opened, naming "
                             "it and the shard; ") + "verify reports the same line",
                   pairs_lost=0, pairs_repeated=len(pairs) - len(set(pairs)), recovery_s=None), {
        "refused (manifest) or skipped whole (table)": (refused is None
                                                         and loader.skipped == loader.manifest.num_pairs(name)
                                                         and not any(s == name for s, _ in pairs)) if in_table
        else isinstance(refused, ManifestError),
        "names the file, shard and sample": expected in said and named in said,
        "verify says the same": said in problems,
    })


@pytest.mark.timeout(120)
def test_pretrain_refuses_a_manifest_that_climbs_out_with_verifys_words(dataset, tmp_path):
    """The issue's own case, through the command line: a manifest naming ../outside.tar."""
    copy, manifest = _copy(dataset, tmp_path)
    (tmp_path / "other").mkdir()
    shutil.copy(copy / "000001.tar", tmp_path / "other" / "000001.tar")
    _hostile(copy, manifest, tmp_path / "other" / "000001.tar", "parent")
    vocab = dataset[1].data.tokenizer
    done = subprocess.run([*job_command("pretrain", launcher="python"), "--config", str(TINY),
                           f"--data.train_manifest={copy}", f"--data.tokenizer={vocab}",
                           f"--checkpoint.dir={tmp_path / 'ckpt'}", f"--tracking.uri=sqlite:///{tmp_path / 'ml.db'}"],
                          cwd=tmp_path, env=job_env(), capture_output=True, text=True, timeout=110)
    _, [problem] = verify.verify(str(copy))
    assert verify.main([str(copy)]) == 1
    assert done.returncode == 2 and problem in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def _corrupt_metadata(dataset, tmp_path) -> tuple[Path, dict, dict]:
    """One sample's KEY.json overwritten with same-length bytes that are not JSON (tar headers intact)."""
    copy, manifest = _copy(dataset, tmp_path)
    entry = manifest["shards"][1]
    sample = entry["samples"][3]
    victim = copy / entry["name"]
    data = bytearray(victim.read_bytes())
    start = _members(victim)[f"{sample['key']}.json"] + 512
    data[start:start + 4] = b"\x00{[:"
    victim.write_bytes(bytes(data))
    return copy, entry, sample


def test_sample_metadata_names_a_sample_whose_json_is_broken(dataset, tmp_path):
    from data_pipeline.shard_format import sample_metadata
    copy, entry, sample = _corrupt_metadata(dataset, tmp_path)
    manifest = Manifest(str(copy))
    with manifest.open_shard(entry["name"], sample["offset"]) as stream:
        from data_pipeline.shard_format import read_listed
        [members] = list(read_listed(stream, [sample], sample["offset"]))
    where = f"{entry['name']}: sample {sample['key']!r}"
    with pytest.raises(ShardFormatError, match=re.escape(f"{where}: its .json member is not JSON")):
        sample_metadata(members, where, sample["captions"])
    good = {"json": json.dumps({"captions": ["a", "b"]}).encode()}
    assert sample_metadata(good, where, 2)["captions"] == ["a", "b"]
    with pytest.raises(ShardFormatError, match="does not hold the 5 captions"):
        sample_metadata(good, where, 5)
