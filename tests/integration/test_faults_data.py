"""Hostile data at read time: shards and manifests that lie, driven through the loader directly.
(Over 300 lines: one fixture dataset serves every hostile case; each case is a few lines.)

Each fault must end in an error that names the shard and the sample's key or offset, or in
the sample skipped and counted; never a huge allocation, a file written, or a hang (with two
loader workers, one worker's failure reaches the main process within seconds). Each test
records its row of the fault table (tests/faults.py) before asserting.
"""

import json
import re
import shutil
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest

from data_pipeline.sample_table import digest, encode_table, table_name
from data_pipeline.shard_format import MANIFEST, ShardFormatError, read_samples, unsafe_member
from data_pipeline.storage import StorageError
from pixelbert_dist.config import load_config
from pixelbert_dist.data.loader import StreamingLoader
from pixelbert_dist.data.plan import Manifest, ManifestError, Segment
from pixelbert_dist.data.stream import read_segment
from tests.datasets import synthetic_shards
from tests.conftest import TINY
from tests.faults import record_fault

SURFACES_WITHIN_S = 10  # a worker's failure reaches the training loop within this


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


def _epoch(url: Path, cfg, workers: int = 2):
    """Every batch of one rank's epoch: (pairs delivered, loader state, error or None, seconds to the error)."""
    loader = StreamingLoader(str(url), cfg.data, 4, num_workers=workers, seed=1)
    return _drain(loader)


def _drain(loader: StreamingLoader):
    pairs, started = [], time.time()
    try:
        for _, info in loader.epoch_batches():
            pairs += info.pairs
    except Exception as err:  # noqa: BLE001 - the test inspects what surfaced
        return pairs, loader.state_dict(), err, time.time() - started
    return pairs, loader.state_dict(), None, time.time() - started


def _conclude(row: dict, checks: dict[str, bool]) -> None:
    """Record the fault row with the test's verdict, then fail on the first check that did not hold."""
    failed = [name for name, ok in checks.items() if not ok]
    record_fault({**row, "passed": not failed})
    assert not failed, f"failed checks: {failed}"


def _files(*roots: Path) -> set[str]:
    return {str(p) for root in roots for p in root.rglob("*")}


@pytest.mark.timeout(120)
def test_a_shard_truncated_after_its_manifest_is_named_before_and_during_the_epoch(dataset, tmp_path):
    copy, manifest = _copy(dataset, tmp_path)
    entry = manifest["shards"][1]
    victim = copy / entry["name"]
    cut = entry["samples"][2]["offset"] + 700  # inside the third sample
    whole = victim.read_bytes()

    # before training: check_shards_present compares sizes
    victim.write_bytes(whole[:cut])
    try:
        Manifest(str(copy)).check_shards_present()
        before = None
    except StorageError as err:
        before = str(err)
    # during the epoch (the object was cut after the start-up check): a read error, named
    victim.write_bytes(whole)
    loader = StreamingLoader(str(copy), dataset[1].data, 4, num_workers=2, seed=1)
    victim.write_bytes(whole[:cut])
    pairs, _, error, seconds = _drain(loader)
    key = entry["samples"][2]["key"]
    _conclude(dict(fault="shard truncated after its manifest was written",
                   what_was_done=f"{entry['name']} cut to {cut} of {len(whole)} bytes, before the start-up check "
                                 "and again mid-epoch (2 loader workers)",
                   expected="start-up check names the shard and both sizes; mid-epoch the worker's read error names "
                            "shard, key and offset in the training process",
                   pairs_lost=0, pairs_repeated=len(pairs) - len(set(pairs)), recovery_s=round(seconds, 2)), {
        "named before training": before is not None and f"shard {entry['name']} is {cut} bytes" in before,
        "mid-epoch error is a ShardFormatError": isinstance(error, ShardFormatError),
        "names shard, key and offset": error is not None and re.search(
            rf"{re.escape(entry['name'])}: sample '{key}' at offset {entry['samples'][2]['offset']}: unexpected end",
            str(error)) is not None,
        "surfaced within bound": seconds < SURFACES_WITHIN_S,
        "no pair twice": len(pairs) == len(set(pairs)),
    })


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["image_bytes", "header_checksum", "keys", "offsets"])
def test_shard_bytes_that_disagree_with_the_manifest(dataset, tmp_path, fault):
    copy, manifest = _copy(dataset, tmp_path)
    entry = manifest["shards"][0]
    victim = copy / entry["name"]
    sample = entry["samples"][1]
    members = _members(victim)
    key = sample["key"]
    if fault == "image_bytes":  # same size, same offsets, another sha256: the image does not decode
        data = bytearray(victim.read_bytes())
        start = members[f"{key}.jpg"] + 512
        garbage = b"\xff\xd8 not a jpeg"
        data[start:start + len(garbage)] = garbage
        data[start + len(garbage):start + 600] = b"\0" * (600 - len(garbage))
        victim.write_bytes(bytes(data))
        done = "12 bytes of one sample's JPEG overwritten (size and offsets unchanged, sha256 differs)"
    elif fault == "header_checksum":
        _patch_header(victim, members[f"{key}.json"], checksum=False)
        done = "one bit of a member header flipped (its checksum no longer matches)"
    elif fault == "keys":  # a tar of the same size with another sample in the listed place
        other = "9" * len(key)
        for ext in ("jpg", "txt", "json"):
            _patch_header(victim, members[f"{key}.{ext}"], name=f"{other}.{ext}")
        done = f"sample {key}'s members renamed {other} (same bytes count, valid headers)"
    else:  # the manifest's offset lands inside the JPEG's data, block-aligned
        sample["offset"] += 1024
        sample["size"] -= 1024
        _save(copy, manifest)
        done = "the manifest's offset of one sample moved 1024 bytes into its JPEG data"
    url = str(copy)
    checksum_error = None
    try:
        Manifest(url).check_shards_present(checksums=True)
    except StorageError as err:
        checksum_error = str(err)
    pairs, state, error, seconds = _epoch(copy, dataset[1])
    repeated = len(pairs) - len(set(pairs))
    row = dict(fault=f"shard bytes disagree with the manifest ({fault})", what_was_done=done,
               pairs_repeated=repeated, recovery_s=round(seconds, 2))
    if fault == "image_bytes":
        consumed = sum(e - s for ranges in state["consumed"].values() for s, e in ranges)
        lost = consumed - len(pairs) - state["skipped"]  # consumed but neither delivered nor counted
        _conclude({**row, "expected": "the sample is skipped and counted (its 5 pairs consumed); "
                                      "check_shards_present(checksums=True) names the sha256 mismatch",
                   "pairs_lost": lost}, {
            "no error": error is None,
            "skipped and counted": state["skipped"] == sample["captions"],
            "the bad image never trains": key not in _keys_of(url, pairs),
            "nothing lost": lost == 0, "no pair twice": repeated == 0,
            "checksum check names the shard": checksum_error is not None
            and f"shard {entry['name']} has sha256" in checksum_error,
        })
    else:
        expect = {"header_checksum": "no valid tar member at byte", "keys": f"holds member '{'9' * len(key)}.jpg'",
                  "offsets": "not a tar sample"}[fault]
        offset = sample["offset"]
        _conclude({**row, "expected": "an error in the training process naming shard, key and offset",
                   "pairs_lost": 0}, {
            "a ShardFormatError": isinstance(error, ShardFormatError),
            "names shard, key, offset and why": error is not None and
            f"{entry['name']}: sample '{key}' at offset {offset}: {expect}" in str(error),
            "surfaced within bound": seconds < SURFACES_WITHIN_S, "no pair twice": repeated == 0,
        })


def _keys_of(url: str, pairs) -> list[str]:
    manifest = Manifest(url)
    keys = []
    for shard_name, index in pairs:
        from pixelbert_dist.data.plan import round_robin
        first, position = manifest.locate(shard_name, index)
        sample, _ = round_robin(manifest.window_counts(shard_name, first))[position]
        keys.append(manifest.table(shard_name).key(first + sample))
    return keys


@pytest.mark.timeout(120)
@pytest.mark.parametrize("member", ["../x.json", "/tmp/pixelbert-fault-abs/x.json", "symlink"])
def test_unsafe_member_names_are_refused_and_nothing_is_written(dataset, tmp_path, member, monkeypatch):
    copy, manifest = _copy(dataset, tmp_path)
    entry = manifest["shards"][2]
    sample = entry["samples"][1]
    header_at = _members(copy / entry["name"])[f"{sample['key']}.json"]
    if member == "symlink":
        _patch_header(copy / entry["name"], header_at, kind=tarfile.SYMTYPE, link="/etc/passwd", size=0)
        shown = f"{sample['key']}.json"
    else:
        _patch_header(copy / entry["name"], header_at, name=member)
        shown = member
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _files(tmp_path)
    pairs, _, error, seconds = _epoch(copy, dataset[1])
    written = _files(tmp_path) - before
    _conclude(dict(fault=f"tar member {member!r}" if member != "symlink" else "tar member is a symlink to /etc/passwd",
                   what_was_done=f"the header of {sample['key']}.json in {entry['name']} rewritten (valid checksum)",
                   expected="an error naming shard, key, offset and the member; no file written anywhere",
                   pairs_lost=0, pairs_repeated=len(pairs) - len(set(pairs)), recovery_s=round(seconds, 2)), {
        "a ShardFormatError": isinstance(error, ShardFormatError),
        "names shard, key, offset, member": error is not None and
        f"{entry['name']}: sample '{sample['key']}' at offset {sample['offset']}: member {shown!r} is not a plain "
        f"file with a safe name" in str(error),
        "nothing written": not written and not Path("/tmp/pixelbert-fault-abs").exists(),
        "surfaced within bound": seconds < SURFACES_WITHIN_S,
    })


@pytest.mark.timeout(120)
def test_a_header_announcing_a_2_gb_caption_is_refused_without_allocating_it(dataset, tmp_path):
    copy, manifest = _copy(dataset, tmp_path)
    entry = manifest["shards"][0]
    sample = entry["samples"][2]
    victim = copy / entry["name"]
    _patch_header(victim, _members(victim)[f"{sample['key']}.txt"], size=2 ** 31)
    url = str(copy)
    where = f"{entry['name']}: sample '{sample['key']}' at offset {sample['offset']}: member '{sample['key']}.txt' " \
            "announces 2147483648 bytes"
    # in this process, as the loader reads (read_segment) and as `verify` walks a tar (read_samples)
    tracemalloc.start()
    try:
        manifest_ = Manifest(url)
        list(read_segment(manifest_, Segment(entry["name"], 0, manifest_.num_pairs(entry["name"]))))
        segment_error = None
    except ShardFormatError as err:
        segment_error = str(err)
    try:
        with victim.open("rb") as stream:
            list(read_samples(stream))
        walk_error = None
    except ShardFormatError as err:
        walk_error = str(err)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # through the loader with 2 workers
    pairs, _, error, seconds = _epoch(copy, dataset[1])
    _conclude(dict(fault="tar header announcing a 2 GB caption",
                   what_was_done=f"size field of {sample['key']}.txt in {entry['name']} set to 2**31 (valid checksum)",
                   expected="an error naming shard, key, offset, member and size; at most a sample's bytes allocated",
                   pairs_lost=0, pairs_repeated=len(pairs) - len(set(pairs)), recovery_s=round(seconds, 2)), {
        "read_segment names it": segment_error is not None and where in segment_error,
        "read_samples names it": walk_error is not None and "announces 2147483648 bytes" in walk_error
        and f"{sample['key']}.txt" in walk_error and str(victim) in walk_error,
        "peak allocation under 32 MiB": peak < 32 << 20,
        "the loader names it": isinstance(error, ShardFormatError) and where in str(error),
        "surfaced within bound": seconds < SURFACES_WITHIN_S,
    })


def _hostile(manifest: dict, outside: Path, fault: str) -> tuple[str, str]:
    """Make `fault` in the manifest; (what was done, text the error must contain)."""
    entry = manifest["shards"][1]
    sample = entry["samples"][1]
    name = entry["name"]
    if fault in ("parent", "absolute", "s3"):
        new = {"parent": "../other/000001.tar", "absolute": str(outside), "s3": "s3://other-bucket/000001.tar"}[fault]
        entry["name"] = new
        return f"shard name {name} -> {new} (a readable copy of the shard lies there)", f"shard {new!r}: a shard name"
    if fault == "url_on_shards":
        entry["url"] = f"s3://other-bucket/{name}"
        return f"a sharding-job manifest's shard given url s3://other-bucket/{name}", f"shard {name!r}: url"
    if fault == "url_elsewhere":
        entry.update(layout="img2dataset", url=f"{outside.parent}/../../x/{name}")
        return "an index manifest's shard url with '..'", f"shard {name!r}: url"
    if fault == "past_end":
        sample["offset"] = entry["bytes"]
    elif fault == "overlap":
        sample["offset"] = entry["samples"][0]["offset"] + 512
    elif fault == "huge_size":
        sample["size"] = 2 ** 31
    elif fault == "unaligned":
        sample["offset"] += 1
    elif fault == "many_captions":
        sample["captions"] = 60_000  # a table's column holds up to 65,535
        return f"sample {sample['key']} lists 60,000 captions", f"shard {name!r}: sample {sample['key']!r} lists"
    return f"sample {sample['key']}: {fault} ({sample['offset']}, {sample['size']} bytes)", \
        f"shard {name!r}: sample {sample['key']!r} at offset {sample['offset']}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", ["parent", "absolute", "s3", "url_on_shards", "url_elsewhere", "past_end",
                                   "overlap", "huge_size", "unaligned", "many_captions"])
def test_a_manifest_that_points_outside_its_dataset_or_lies_about_offsets_is_refused(dataset, tmp_path, fault):
    copy, manifest = _copy(dataset, tmp_path)
    (tmp_path / "other").mkdir()
    outside = tmp_path / "other" / "000001.tar"
    shutil.copy(copy / "000001.tar", outside)  # it would read fine: only the name is wrong
    done, expected_text = _hostile(manifest, outside, fault)
    _save(copy, manifest)
    started = time.time()
    try:  # names and urls are refused when the manifest is read; a sample when its shard's table is
        loader = StreamingLoader(str(copy), dataset[1].data, 4, num_workers=0, seed=1)
        for _ in loader.epoch_batches():
            pass
        error = None
    except Exception as err:  # noqa: BLE001
        error = err
    seconds = time.time() - started
    in_table = "sample" in expected_text
    named = f"{copy}/{table_name(manifest['shards'][1]['name'])}" if in_table else f"{copy}/{MANIFEST}"
    _conclude(dict(fault=f"hostile {'sample table' if in_table else 'manifest'} ({fault})", what_was_done=done,
                   expected="ManifestError naming the manifest (or the shard's sample table), shard and sample, "
                            "before the shard's bytes are read",
                   pairs_lost=0, pairs_repeated=0, recovery_s=round(seconds, 2)), {
        "a ManifestError": isinstance(error, ManifestError),
        "names the file, shard, sample": error is not None and expected_text in str(error) and named in str(error),
    })


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


@pytest.mark.timeout(120)
def test_a_sample_whose_json_is_broken_is_named_by_the_loader(dataset, tmp_path):
    copy, entry, sample = _corrupt_metadata(dataset, tmp_path)
    pairs, _, error, seconds = _epoch(copy, dataset[1])
    ok = isinstance(error, ShardFormatError) and f"sample {sample['key']!r}" in str(error) \
        and entry["name"] in str(error) and seconds < SURFACES_WITHIN_S
    record_fault(dict(fault="a sample's KEY.json is not JSON (tar headers intact)",
                      what_was_done=f"4 bytes of {sample['key']}.json in {entry['name']} overwritten",
                      expected="an error naming shard and key", pairs_lost=0,
                      pairs_repeated=len(pairs) - len(set(pairs)), recovery_s=round(seconds, 2), passed=ok))
    assert ok, error


@pytest.mark.parametrize("damage", ["changed", "missing", "cut_short"])
def test_a_sample_table_that_changed_or_vanished_after_the_manifest_is_named(dataset, tmp_path, damage):
    copy, manifest = _copy(dataset, tmp_path)
    name = manifest["shards"][2]["name"]
    table = copy / table_name(name)
    data = table.read_bytes()
    if damage == "changed":  # one offset byte flipped; the manifest's sha256 still names the old table
        table.write_bytes(data[:-20] + bytes([data[-20] ^ 1]) + data[-19:])
    elif damage == "missing":
        table.unlink()
    else:
        table.write_bytes(data[:len(data) // 2])
    try:
        loader = StreamingLoader(str(copy), dataset[1].data, 4, num_workers=0, seed=1)
        for _ in loader.epoch_batches():
            pass
        error = None
    except Exception as err:  # noqa: BLE001
        error = err
    _conclude(dict(fault=f"sample table {damage} after the manifest was written",
                   what_was_done=f"{table_name(name)}: {damage}", expected="ManifestError naming the table and shard",
                   pairs_lost=0, pairs_repeated=0, recovery_s=None), {
        "a ManifestError": isinstance(error, ManifestError),
        "names table and shard": error is not None and f"{copy}/{table_name(name)}: shard {name!r}" in str(error),
    })
