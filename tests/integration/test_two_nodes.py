"""Two nodes for real: two network namespaces joined by a veth pair, one DeepSpeed-launched rank in each.

    pbnode0-PID  10.213.0.1/24  moto_server (shards + checkpoint mirror), node rank 0, the master
    pbnode1-PID  10.213.0.2/24  node rank 1

Each node runs `deepspeed --hostfile H --no_ssh --node_rank N --master_addr 10.213.0.1`, with
gloo on its own veth (GLOO_SOCKET_IFNAME) and its own checkpoint folder; they share only the
S3 server. The addresses exist only inside the namespaces, so nothing leaves this machine.
Making namespaces needs root (CAP_SYS_ADMIN); without it the test skips.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.datasets import synthetic_shards
from tests.conftest import TINY
from tests.launch import BIN, REPO, job_env

MASTER, NODE1 = "10.213.0.1", "10.213.0.2"
S3_PORT, MASTER_PORT = 9000, 29500  # ports inside the namespaces: nothing else listens there
IMAGES, CAPTIONS = 32, 5  # 160 pairs: 20 steps of 8 on 2 ranks

# Runs inside a namespace (`ip netns exec`): the test process cannot reach 10.213.0.x itself.
S3_HELPER = r"""
import json, sys, time
from pathlib import Path
from data_pipeline.storage import open_storage, s3_client

op, *args = sys.argv[1:]
deadline = time.time() + 60
while True:  # moto_server may still be starting
    try:
        s3_client().list_buckets()
        break
    except Exception:
        if time.time() > deadline:
            raise
        time.sleep(0.2)

def complete(url):
    return sorted(n.split("/")[0] for n in open_storage(url).list() if n.endswith("/complete.json"))

if op == "setup":  # BUCKET... then LOCAL_DIR S3_URL: buckets made, a local folder copied up
    *buckets, folder, url = args
    for bucket in buckets:
        s3_client().create_bucket(Bucket=bucket)
    store = open_storage(url)
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            store.upload_file(path.relative_to(folder).as_posix(), str(path))
    print("ok")
elif op == "wait":  # URL TIMEOUT: the first complete checkpoint of the mirror
    url, timeout = args[0], time.time() + float(args[1])
    while not complete(url):
        if time.time() > timeout:
            sys.exit("no complete checkpoint in the mirror")
        time.sleep(0.1)
    print(json.dumps(complete(url)))
elif op == "tags":  # URL: the mirror's complete checkpoints
    print(json.dumps(complete(args[0])))
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


class TwoNodes:
    """Two namespaces over a veth pair; everything started in them is killed at the end."""

    def __init__(self) -> None:
        tag = os.getpid()
        self.ns = [f"pbnode0-{tag}", f"pbnode1-{tag}"]
        self.veth = [f"pbv0-{tag}", f"pbv1-{tag}"]  # interface names: at most 15 characters
        self.addr = [MASTER, NODE1]
        self.procs: list[subprocess.Popen] = []

    def create(self) -> None:
        for node, ns in enumerate(self.ns):
            _ip("netns", "add", ns)
            # `ip netns exec` mounts these over /etc: the names resolve to the namespaces' addresses,
            # and a lookup of anything else fails at once instead of waiting on a nameserver that
            # the namespace cannot reach (c10d's reverse lookups then cost seconds each)
            etc = Path("/etc/netns") / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.addr[node]} {socket.gethostname()} pbnode{node}\n"
                                       f"{self.addr[1 - node]} pbnode{1 - node}\n")
            (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        # made straight inside the namespaces: the addresses never exist on this machine's side
        _ip("link", "add", self.veth[0], "netns", self.ns[0], "type", "veth", "peer", "name", self.veth[1],
            "netns", self.ns[1])
        for ns, veth, addr in zip(self.ns, self.veth, self.addr):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def exec(self, node: int, command: list[str], **popen) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[node], *command], start_new_session=True, **popen)
        self.procs.append(proc)
        return proc

    def destroy(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in self.ns:  # whatever is left inside (loader workers, orphans)
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.ns:
            _ip("netns", "del", ns, check=False)  # takes its end of the veth pair with it
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


@pytest.fixture
def two_nodes():
    if sys.platform != "linux" or shutil.which("ip") is None:
        pytest.skip("needs Linux network namespaces and iproute2's `ip`")
    nodes = TwoNodes()
    probe = subprocess.run(["ip", "netns", "add", nodes.ns[0]], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make network namespaces (`ip netns add`: {probe.stderr.strip()})")
    _ip("netns", "del", nodes.ns[0], check=False)
    try:
        nodes.create()
        yield nodes
    finally:
        nodes.destroy()


def _node_env(nodes: TwoNodes, node: int) -> dict[str, str]:
    env = {k: v for k, v in job_env().items() if "proxy" not in k.lower()}
    # DeepSpeed JIT-builds its shm op at init; in the shared ~/.cache/torch_extensions, builds for
    # other checkouts overwrite it, and a rebuild under the file lock stalled both nodes for minutes
    extensions = Path(sys.prefix) / "torch_extensions"
    return {**env, "PATH": f"{BIN}:{os.environ['PATH']}", "TORCH_EXTENSIONS_DIR": str(extensions),
            "GLOO_SOCKET_IFNAME": nodes.veth[node],
            "AWS_ENDPOINT_URL": f"http://{MASTER}:{S3_PORT}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _s3(nodes: TwoNodes, node: int, *args: str, timeout: float = 120) -> list | str:
    done = subprocess.run(["ip", "netns", "exec", nodes.ns[node], sys.executable, "-c", S3_HELPER, *args],
                          env=_node_env(nodes, node), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.strip().splitlines()[-1]
    return out if out == "ok" else json.loads(out)


def _pairs(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob("rank*.jsonl")) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_nodes_kill_minus_9_of_one_node_and_resume_from_the_mirror_on_fresh_nodes(two_nodes, tmp_path,
                                                                                        ray_local):
    nodes = two_nodes
    _, vocab = synthetic_shards(tmp_path, IMAGES, seed=12, shard_size=8)
    from pixelbert_dist.data.plan import Manifest
    total_pairs = Manifest(str(tmp_path / "shards")).total_pairs
    assert total_pairs == IMAGES * CAPTIONS

    moto = nodes.exec(0, [str(BIN / "moto_server"), "-H", MASTER, "-p", str(S3_PORT)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # from node 1: the shards cross the veth, so the wiring is checked before any training
    assert _s3(nodes, 1, "setup", "data", "ckpt", str(tmp_path / "shards"), "s3://data/shards") == "ok"
    assert moto.poll() is None
    mirror = "s3://ckpt/run"

    hostfile = tmp_path / "hosts"  # with --no_ssh the names are labels: node_rank N takes line N
    hostfile.write_text("pbnode0 slots=1\npbnode1 slots=1\n")

    def start(node: int, run: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        home = tmp_path / f"node{node}"  # node-local: nothing here is shared with the other node
        home.mkdir(exist_ok=True)
        settings = {
            "data.train_manifest": "s3://data/shards", "data.tokenizer": vocab,
            "model.vocab_size": len(vocab.read_text().split()), "data.image_short_side": 128,
            "data.image_long_side": 192, "data.num_workers": 1, "model.pixel_sample_count": 4,
            "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.epochs": 1, "train.log_every": 1,
            "checkpoint.every_steps": 2, "checkpoint.dir": home / f"ckpt-{run}", "checkpoint.mirror": mirror,
            "train.log_pairs_to": home / f"pairs-{run}", "tracking.uri": f"sqlite:///{home / 'mlruns.db'}",
            "tracking.log_model": "false", "deepspeed.config": REPO / "configs/deepspeed/zero2.json",
        }
        command = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={node}",
                   "--master_addr", MASTER, f"--master_port={MASTER_PORT + int(run[-1])}",  # a new port per run
                   "--module", "pixelbert_dist.pretrain", "--config", str(TINY),
                   *(f"--{k}={v}" for k, v in settings.items()), *extra]
        with (tmp_path / f"node{node}-{run}.log").open("w") as log:
            return nodes.exec(node, command, cwd=home, env=_node_env(nodes, node), stdout=log,
                              stderr=subprocess.STDOUT)

    def log_of(node: int, run: str) -> str:
        return (tmp_path / f"node{node}-{run}.log").read_text()

    # run 1: train until the mirror holds a complete checkpoint, then kill -9 node 1's rank
    import psutil
    run1 = [start(0, "run1"), start(1, "run1")]
    waiter = nodes.exec(1, [sys.executable, "-c", S3_HELPER, "wait", mirror, "240"], env=_node_env(nodes, 1),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while waiter.poll() is None:
        assert all(p.poll() is None for p in run1), log_of(0, "run1")[-3000:] + log_of(1, "run1")[-3000:]
        time.sleep(0.1)
    assert waiter.returncode == 0, waiter.stderr.read()[-2000:] + log_of(0, "run1")[-3000:]
    # the training process itself (its loader worker shares its command line): the launch's child
    [launch] = [p for p in psutil.Process(run1[1].pid).children() if "deepspeed.launcher.launch" in p.cmdline()]
    [victim] = launch.children()
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    run1[0].wait(timeout=120)
    fail_s = time.time() - killed_at
    run1[1].wait(timeout=60)
    assert run1[0].returncode != 0, "node 0 ended well: the kill came after the epoch's end"
    assert run1[1].returncode != 0
    assert fail_s < 60, f"node 0 took {fail_s:.0f} s to fail"  # it noticed; no hang
    [*_, newest] = _s3(nodes, 0, "tags", mirror)
    resume_step = int(newest.removeprefix("step"))

    # run 2: both nodes on fresh local folders; --resume auto fetches the mirror's newest checkpoint
    resumed_at = time.time()
    run2 = [start(0, "run2", ("--resume", "auto")), start(1, "run2", ("--resume", "auto"))]
    first_log = tmp_path / "node0" / "pairs-run2" / "rank0.jsonl"
    while not (first_log.exists() and first_log.read_text().strip()):
        assert all(p.poll() is None for p in run2), log_of(0, "run2")[-3000:] + log_of(1, "run2")[-3000:]
        assert time.time() - resumed_at < 240, "the resumed job trained no step"
        time.sleep(0.1)
    first_step_s, recovery_s = time.time() - resumed_at, time.time() - killed_at
    for proc in run2:
        proc.wait(timeout=300)
    assert [p.returncode for p in run2] == [0, 0], log_of(0, "run2")[-3000:] + log_of(1, "run2")[-3000:]
    assert f"at step {resume_step} " in log_of(0, "run2") and "resumed from" in log_of(0, "run2")

    # every pair of the epoch once: steps before the checkpoint from run 1, the rest from run 2
    steps = total_pairs // 8
    before = [r for n in (0, 1) for r in _pairs(tmp_path / f"node{n}" / "pairs-run1") if r["step"] < resume_step]
    redone = [r for n in (0, 1) for r in _pairs(tmp_path / f"node{n}" / "pairs-run1") if r["step"] >= resume_step]
    after = [r for n in (0, 1) for r in _pairs(tmp_path / f"node{n}" / "pairs-run2")]
    seen = [tuple(p) for r in before + after for p in r["pairs"]]
    pairs_repeated, pairs_lost = len(seen) - len(set(seen)), total_pairs - len(set(seen))
    every_pair_once = pairs_repeated == 0 and pairs_lost == 0 and {r["step"] for r in after} == set(
        range(resume_step, steps))

    from tests.faults import record_fault
    record_fault(dict(  # before the asserts: a failure is a row too
        fault="two nodes (network namespaces over veth): kill -9 of node 1's rank mid-epoch",
        what_was_done=(f"one deepspeed --no_ssh launcher per node, checkpoints every 2 steps mirrored to S3; "
                       f"node 1's rank killed after the first mirrored checkpoint (node 0 failed {fail_s:.1f} s "
                       f"later); both nodes resumed with --resume auto on fresh local folders from the mirror's "
                       f"step {resume_step} of {steps} (first step {first_step_s:.1f} s after the restart; "
                       f"{len(redone)} rank-steps trained after that checkpoint were redone)"),
        expected="node 0 exits non-zero without hanging; the resumed job ends the epoch; every pair once",
        pairs_lost=pairs_lost, pairs_repeated=pairs_repeated, recovery_s=round(recovery_s, 1),
        passed=every_pair_once and 0 < resume_step < steps))
    assert 0 < resume_step < steps  # the kill landed mid-epoch
    assert every_pair_once, (pairs_lost, pairs_repeated, sorted({r["step"] for r in after}))
    final = f"step{steps:08d}"
    assert (tmp_path / "node0" / "ckpt-run2" / final / "complete.json").exists()
    assert any("zero_pp_rank_1_" in p.name for p in (tmp_path / "node1" / "ckpt-run2" / final).rglob("*"))
    assert _s3(nodes, 0, "tags", mirror)[-1] == final
