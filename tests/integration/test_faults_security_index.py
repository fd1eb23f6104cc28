"""Hostile tars for the index job, hostile manifests for `verify` and the loader (issue 21, holes 7-9).

The index job runs here without Ray (index_tar + write_manifest: what `main` calls around its
Ray tasks), in a child process so its peak memory can be measured alone. "Nothing was opened
outside" is observed with an audit hook (PEP 578): every `open` the process makes while a check
runs is recorded, and the outside file must not be among them. Each test records its row of
the fault table before asserting.
"""

import io
import json
import os
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from data_pipeline import verify
from data_pipeline.index import write_manifest
from data_pipeline.sample_table import digest, encode_table, table_name
from data_pipeline.shard_format import (INDEX_FORMAT, MANIFEST, MAX_MEMBER_BYTES, ShardFormatError, ShardWriter,
                                        dali_index)
from data_pipeline.storage import open_storage, s3_client, sha256_of
from pixelbert_dist.data.plan import Manifest, ManifestError, Segment
from pixelbert_dist.data.stream import read_segment
from tests.faults import record_fault

REPO = Path(__file__).resolve().parents[2]
BIG, HUGE, WIDE = 100 << 20, 300 << 20, 60 << 20  # over the member cap, far over it, just under it
MEMORY_RISE_BOUND = 16 << 20  # the indexer's peak RSS may grow this much over a whole 460 MiB tar
GOOD = ["good0", "wide60", "good1"]
BAD_JSON = {"deep": b"[" * 100_000, "latin1": '{"caption": "caf\u00e9"}'.encode("latin-1"),
            "bignum": b'{"caption": "a cat", "n": 1' + b"0" * 5000 + b"}"}


def _row(fault: str, done: str, expected: str, passed: bool) -> None:
    record_fault({"section": "security", "fault": fault, "what_was_done": done, "expected": expected,
                  "pairs_lost": None, "pairs_repeated": None, "recovery_s": None, "passed": passed})


# ---------------------------------------------------------------------------- what was opened

_recording: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _recording is not None and isinstance(args[0], (str, bytes, os.PathLike)):
        _recording.append(os.fsdecode(args[0]))


@contextmanager
def _opened():
    """The real paths of every file this process opens inside the block."""
    global _recording
    if not getattr(_audit, "installed", False):
        sys.addaudithook(_audit)  # process-wide and permanent: it only looks while _recording is a list
        _audit.installed = True
    paths: list[str] = []
    _recording = paths
    try:
        yield paths
    finally:
        _recording = None
        paths[:] = [os.path.realpath(p) for p in paths]


# ---------------------------------------------------------------------------- a hostile tar

def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


class _Filler:
    """`size` real bytes, `head` then a repeating pattern, in exactly the chunks tarfile asks for."""

    PATTERN = bytes(range(1, 256)) * 4112  # ~1 MiB

    def __init__(self, size: int, head: bytes = b"") -> None:
        self.head, self.left = head, size

    def read(self, n: int) -> bytes:
        n = min(n, self.left)
        out, self.head = self.head[:n], self.head[n:]
        while len(out) < n:
            out += self.PATTERN[:n - len(out)]
        self.left -= n
        return out


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data) if size is None else size
    tar.addfile(info, io.BytesIO(data) if size is None else _Filler(size, data))


def _write_hostile(path: Path) -> None:
    """Good samples around a 100 MiB caption, a 300 MiB image, a 60 MiB image (under the cap: indexed,
    but it must stream through) and KEY.json members no parser should be trusted with."""
    jpeg = _jpeg()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "good0.jpg", jpeg)
        _add(tar, "good0.txt", b"a red square")
        _add(tar, "big100.jpg", jpeg)
        _add(tar, "big100.txt", size=BIG)
        _add(tar, "huge300.jpg", jpeg, size=HUGE)
        _add(tar, "huge300.txt", b"a huge one")
        _add(tar, "wide60.jpg", jpeg, size=WIDE)  # a valid JPEG followed by 60 MiB: PIL parses its header
        _add(tar, "wide60.txt", b"a wide one")
        for key, data in BAD_JSON.items():
            _add(tar, f"{key}.jpg", jpeg)
            _add(tar, f"{key}.json", data)
        _add(tar, "good1.jpg", jpeg)
        _add(tar, "good1.json", b'{"caption": "a blue circle"}')


CHILD = """
import json, resource, sys
from data_pipeline.index import index_tar
tars, out, warm_out = sys.argv[1:]
index_tar("warm.tar", f"{tars}/warm.tar", warm_out, 10**8)  # PIL's plugins, json, tempfile: all loaded
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = index_tar("hostile.tar", f"{tars}/hostile.tar", out, 10**8)
rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"rise": rise, "result": result}))
"""


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    """hostile.tar indexed once, in a child process whose peak RSS is measured around it."""
    root = tmp_path_factory.mktemp("hostile-index")
    tars, out = root / "tars", root / "index"
    tars.mkdir()
    _write_hostile(tars / "hostile.tar")
    with tarfile.open(tars / "warm.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "w.jpg", _jpeg())
        _add(tar, "w.json", b'{"caption": "warm"}')
    done = subprocess.run([sys.executable, "-c", CHILD, str(tars), str(out), str(root / "warm-index")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    child = json.loads(done.stdout.splitlines()[-1])
    manifest = write_manifest(open_storage(str(out)), [child["result"]], False, [str(tars)], 10**8, 0.0)
    result = json.loads((out / "hostile_index.json").read_text())  # every skipped sample named: per tar
    return {"root": root, "tars": tars, "out": out, "rise": child["rise"], "manifest": manifest,
            "skipped": {s["key"]: s for s in result["skipped"]}}


def _pairs(url: str) -> dict[str, tuple[str, int]]:
    """key -> (caption, image bytes) of every pair the loader reads from the dataset."""
    manifest = Manifest(url)
    return {p.key: (p.caption, len(p.jpeg)) for shard in manifest.shard_names()
            for p in read_segment(manifest, Segment(shard, 0, manifest.num_pairs(shard)))}


def test_index_skips_a_member_over_the_loaders_cap_and_the_loader_never_meets_it(indexed):
    skipped, stats = indexed["skipped"], indexed["manifest"]["stats"]
    big = skipped.get("big100", {})
    pairs = _pairs(str(indexed["out"]))
    passed = (big.get("reason") == "too_large" and f"{BIG} bytes" in big.get("detail", "")
              and str(MAX_MEMBER_BYTES) in big.get("detail", "") and stats["skipped"].get("too_large") == 2
              and sorted(pairs) == sorted(GOOD) and pairs["wide60"][1] == WIDE)
    _row("index: member over the loader's cap", "a tar whose big100.txt holds 100 MiB (cap 64 MiB), indexed",
         "big100 skipped as too_large, counted in the manifest's stats; the loader reads only the good samples",
         passed)
    assert big.get("reason") == "too_large" and f"{BIG} bytes" in big["detail"], big
    assert str(MAX_MEMBER_BYTES) in big["detail"]  # the loader's own cap, named
    assert stats["skipped"]["too_large"] == 2  # big100 and huge300
    assert indexed["manifest"]["settings"]["max_member_bytes"] == MAX_MEMBER_BYTES
    assert sorted(pairs) == sorted(GOOD)  # read through the loader: no ShardFormatError, nothing skipped listed
    assert pairs["wide60"][1] == WIDE and pairs["good1"][0] == "a blue circle"


def test_index_streams_a_300mib_member_in_bounded_memory(indexed):
    huge = indexed["skipped"].get("huge300", {})
    shard = indexed["manifest"]["shards"][0]
    tar_bytes = (indexed["tars"] / "hostile.tar").stat().st_size
    passed = (indexed["rise"] < MEMORY_RISE_BOUND and huge.get("reason") == "too_large"
              and shard["bytes"] == tar_bytes)
    _row("index: member read whole", f"a {tar_bytes >> 20} MiB tar with a 300 MiB and a 60 MiB image member, "
         "indexed in a child process", f"peak RSS rises < {MEMORY_RISE_BOUND >> 20} MiB "
         f"(measured {indexed['rise'] / 2**20:.1f} MiB); huge300 skipped as too_large", passed)
    assert indexed["rise"] < MEMORY_RISE_BOUND, f"peak RSS rose {indexed['rise'] / 2**20:.1f} MiB"
    assert huge.get("reason") == "too_large" and f"{HUGE} bytes" in huge["detail"]
    assert shard["bytes"] == tar_bytes  # every byte went through the hash, none was held


def test_unparseable_json_is_a_counted_skip_never_a_crash(indexed, tmp_path):
    skipped, stats = indexed["skipped"], indexed["manifest"]["stats"]
    reasons = {key: skipped.get(key, {}).get("reason") for key in BAD_JSON}
    # the same deep KEY.json listed by a manifest (its tar replaced after indexing): the loader names it
    with tarfile.open(indexed["tars"] / "hostile.tar") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("deep.")]
    end = members[-1].offset_data + -(-members[-1].size // 512) * 512
    tampered = json.loads(json.dumps(indexed["manifest"]))
    table = encode_table([{"key": "deep", "offset": members[0].offset, "size": end - members[0].offset,
                           "captions": 1}])
    tampered["shards"][0].update(num_samples=1, num_captions=1, table_bytes=len(table), table_sha256=digest(table))
    (tmp_path / table_name(tampered["shards"][0]["name"])).write_bytes(table)
    (tmp_path / MANIFEST).write_text(json.dumps(tampered))
    try:
        _pairs(str(tmp_path))
        loader_error = None
    except Exception as err:  # noqa: BLE001 - the test names it
        loader_error = err
    passed = (reasons == dict.fromkeys(BAD_JSON, "bad_json") and stats["skipped"].get("bad_json") == 3
              and isinstance(loader_error, ShardFormatError) and "'deep'" in str(loader_error))
    _row("index: KEY.json that does not parse", "KEY.json members '[' * 100000, Latin-1 bytes, a 5000-digit "
         "number; then a manifest listing the deep one", "each skipped as bad_json and counted; the loader "
         "names the listed one as a ShardFormatError, not a RecursionError", passed)
    assert reasons == dict.fromkeys(BAD_JSON, "bad_json"), skipped
    assert "RecursionError" in skipped["deep"]["detail"]
    assert stats["skipped"]["bad_json"] == 3
    assert isinstance(loader_error, ShardFormatError) and "'deep'" in str(loader_error), repr(loader_error)


# ---------------------------------------------------------------------------- verify

def _shard_entry(path: Path, name: str) -> tuple[dict, str]:
    """A manifest entry that matches the tar at `path` in every way but its name."""
    with path.open("wb") as f:
        writer = ShardWriter(f)
        writer.write("a", {"jpg": _jpeg(), "json": json.dumps({"captions": ["x"]}).encode()})
        writer.close()
    with path.open("rb") as f:
        digest, size = sha256_of(f)
    return {"name": name, "index": "000000.idx", "bytes": size, "sha256": digest, "num_samples": 1,
            "samples": [{**e.to_manifest(), "captions": 1} for e in writer.samples]}, dali_index(writer.samples)


@pytest.mark.parametrize("case", ["climbs", "absolute", "truncated"])
def test_verify_checks_the_manifest_before_opening_any_shard(tmp_path, capsys, case):
    dataset, outside = tmp_path / "dataset", tmp_path / "outside.tar"
    dataset.mkdir()
    name = {"climbs": "../outside.tar", "absolute": str(outside), "truncated": "000000.tar"}[case]
    entry, index = _shard_entry(outside, name)
    (dataset / "000000.idx").write_text(index)
    manifest = json.dumps({"shards": [entry], "num_shards": 1, "num_samples": 1, "num_captions": 1,
                           "stats": {"bytes": entry["bytes"], "written": {}, "skipped": {}}})
    (dataset / MANIFEST).write_text(manifest[:len(manifest) // 2] if case == "truncated" else manifest)
    with _opened() as opened:
        rc = verify.main([str(dataset)])
    out = capsys.readouterr().out
    expected = ("is not JSON" if case == "truncated" else f"shard {name!r}: a shard name must be")
    passed = (rc == 1 and f"{dataset}/{MANIFEST}" in out and expected in out and str(outside) not in opened
              and "Traceback" not in out)
    _row(f"verify: manifest {case}", {"climbs": "a manifest naming ../outside.tar",
                                      "absolute": "a manifest naming an absolute shard outside the dataset",
                                      "truncated": "a manifest.json cut in half"}[case],
         "verify exits 1 naming the manifest (and shard); the outside tar is never opened", passed)
    assert rc == 1 and f"{dataset}/{MANIFEST}" in out and expected in out, out
    assert str(outside) not in opened, opened


# ---------------------------------------------------------------------------- the loader


def _index_manifest(sources: list[str], shards: list[tuple[str, str]]) -> dict:
    """Sizes that /etc/passwd matches (a loader that took the url would open and hash it)."""
    size = os.path.getsize("/etc/passwd")
    return {"format": INDEX_FORMAT, "sources": sources, "shards": [
        {"name": name, "url": link, "layout": "img2dataset", "index": "x.idx", "bytes": size, "num_samples": 1,
         "num_captions": 1, "table_bytes": 128, "table_sha256": "0" * 64} for name, link in shards]}


HOSTILE_URLS = {"absolute": "/etc/passwd", "file-url": "file:///etc/passwd", "other-bucket": "s3://other-bucket/passwd",
                "climbs": "{tars}/../../../../../../etc/passwd", "symlink": "{tars}/passwd"}


@pytest.mark.parametrize("case", sorted(HOSTILE_URLS))
def test_loader_refuses_an_index_url_outside_its_sources(tmp_path, s3_server, case):
    tars, dataset = tmp_path / "tars", tmp_path / "index"
    tars.mkdir()
    dataset.mkdir()
    (tars / "passwd").symlink_to("/etc/passwd")  # inside the recorded source, resolving outside
    # control: urls under the recorded source, plain or file://, load
    (dataset / MANIFEST).write_text(json.dumps(_index_manifest([str(tars)], [
        ("a.tar", f"{tars}/a.tar"), ("sub/b.tar", f"file://{tars}/sub/b.tar")])))
    assert sorted(Manifest(str(dataset)).shards) == ["a.tar", "sub/b.tar"]
    link = HOSTILE_URLS[case].format(tars=tars)
    (dataset / MANIFEST).write_text(json.dumps(_index_manifest([str(tars)], [("passwd", link)])))
    with _opened() as opened:
        try:
            Manifest(str(dataset)).check_shards_present(checksums=True)
            error = None
        except Exception as err:  # noqa: BLE001 - the test names it
            error = err
    message = str(error)
    passed = (isinstance(error, ManifestError) and f"{dataset}/{MANIFEST}: shard 'passwd'" in message
              and repr(link) in message and "/etc/passwd" not in opened)
    _row(f"loader: index url {case}", f"an index manifest whose shard 'passwd' has url {HOSTILE_URLS[case]}",
         "refused when the manifest is read, naming manifest, shard and url; /etc/passwd never opened", passed)
    assert isinstance(error, ManifestError), repr(error)
    assert f"{dataset}/{MANIFEST}: shard 'passwd'" in message and repr(link) in message, message
    assert "/etc/passwd" not in opened


def test_a_bucket_manifest_cannot_vouch_for_roots_outside_its_bucket(bucket):
    """The recorded sources are written by whoever writes the manifest: in a bucket they count only
    inside that bucket; another bucket or a local path needs the run's own data.shard_roots."""
    client, url = s3_client(), f"s3://{bucket}/index"
    outcomes = {}
    for link in ("/etc/passwd", "s3://other-bucket/passwd", f"s3://{bucket}/laion/passwd"):
        manifest = _index_manifest(["/etc", "s3://other-bucket", f"s3://{bucket}/laion"], [("passwd", link)])
        client.put_object(Bucket=bucket, Key=f"index/{MANIFEST}", Body=json.dumps(manifest).encode())
        try:
            Manifest(url)
            outcomes[link] = "loaded"
        except ManifestError as err:
            outcomes[link] = "refused" if f"{url}/{MANIFEST}: shard 'passwd'" in str(err) else str(err)
    manifest = _index_manifest([], [("passwd", "s3://other-bucket/passwd")])
    client.put_object(Bucket=bucket, Key=f"index/{MANIFEST}", Body=json.dumps(manifest).encode())
    allowed = Manifest(url, shard_roots=["s3://other-bucket/"]).shards["passwd"]["url"]
    expected = {"/etc/passwd": "refused", "s3://other-bucket/passwd": "refused",
                f"s3://{bucket}/laion/passwd": "loaded"}
    passed = outcomes == expected and allowed == "s3://other-bucket/passwd"
    _row("loader: bucket manifest vouching for outside roots", "a manifest in a bucket recording sources /etc "
         "and s3://other-bucket, urls /etc/passwd and s3://other-bucket/passwd", "both refused; a url under a "
         "source in its own bucket loads; data.shard_roots allows another bucket explicitly", passed)
    assert outcomes == expected
    assert allowed == "s3://other-bucket/passwd"
