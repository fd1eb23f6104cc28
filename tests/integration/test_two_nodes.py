"""Two nodes for real: two network namespaces joined by a veth pair, one DeepSpeed-launched rank in each.

    pbnode0-PID  10.213.0.1/24  moto_server (shards + checkpoint mirror), node rank 0, the master
    pbnode1-PID  10.213.0.2/24  node rank 1

Two ways to lose node 1 mid-epoch: its rank killed (its sockets close: node 0 hears at once),
or its link taken down (nothing closes: node 0 waits out train.collective_timeout_s), the
latter followed by `--resume auto` on fresh local folders from the S3 mirror. Both tests
share the namespaces, the S3 server and the shards (the module's `cluster`).

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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ray_local):
    """Two nodes, the S3 server on node 0 holding the shards, a hostfile and an MLflow store with
    its tables made (node 0's rank 0 copies it: the minutes of a first schema migration are not
    spent while node 1 waits in a collective). Shared by the tests of this module."""
    if sys.platform != "linux" or shutil.which("ip") is None:
        pytest.skip("needs Linux network namespaces and iproute2's `ip`")
    nodes = TwoNodes()
    probe = subprocess.run(["ip", "netns", "add", nodes.ns[0]], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make network namespaces (`ip netns add`: {probe.stderr.strip()})")
    _ip("netns", "del", nodes.ns[0], check=False)
    root = tmp_path_factory.mktemp("two-nodes")
    try:
        nodes.create()
        _, vocab = synthetic_shards(root, IMAGES, seed=12, shard_size=8)
        from pixelbert_dist.data.plan import Manifest
        total_pairs = Manifest(str(root / "shards")).total_pairs
        assert total_pairs == IMAGES * CAPTIONS
        moto = nodes.exec(0, [str(BIN / "moto_server"), "-H", MASTER, "-p", str(S3_PORT)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # from node 1: the shards cross the veth, so the wiring is checked before any training
        assert _s3(nodes, 1, "setup", "data", "ckpt", str(root / "shards"), "s3://data/shards") == "ok"
        assert moto.poll() is None
        hostfile = root / "hosts"  # with --no_ssh the names are labels: node_rank N takes line N
        hostfile.write_text("pbnode0 slots=1\npbnode1 slots=1\n")
        mlflow_db = root / "mlruns.db"
        subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.set_tracking_uri('sqlite:///{mlflow_db}'); "
                        "mlflow.search_experiments()"], check=True, capture_output=True, timeout=300)
        yield Cluster(nodes, vocab, total_pairs, hostfile, mlflow_db)
    finally:
        nodes.destroy()


class Cluster:
    """What a test starts jobs with: `start(tmp_path, node, run, mirror, extra)` runs one node's
    launcher (its checkpoints and pair log under tmp_path/nodeN, its output in tmp_path/nodeN-RUN.log)."""

    def __init__(self, nodes: TwoNodes, vocab: Path, total_pairs: int, hostfile: Path, mlflow_db: Path) -> None:
        self.nodes, self.vocab, self.total_pairs, self.hostfile = nodes, vocab, total_pairs, hostfile
        self.mlflow_db = mlflow_db
        self.runs = 0  # a new master port per run: the last run's may still be closing

    def start(self, tmp_path: Path, node: int, run: str, mirror: str, extra: tuple[str, ...] = ()) -> subprocess.Popen:
        home = tmp_path / f"node{node}"  # node-local: nothing here is shared with the other node
        home.mkdir(exist_ok=True)
        if node == 0 and not (home / "mlruns.db").exists():
            shutil.copy(self.mlflow_db, home / "mlruns.db")
        self.runs += node == 0
        settings = {
            "data.train_manifest": "s3://data/shards", "data.tokenizer": self.vocab,
            "model.vocab_size": len(self.vocab.read_text().split()), "data.image_short_side": 128,
            "data.image_long_side": 192, "data.num_workers": 1, "model.pixel_sample_count": 4,
            "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.epochs": 1, "train.log_every": 1,
            "checkpoint.every_steps": 2, "checkpoint.dir": home / f"ckpt-{run}", "checkpoint.mirror": mirror,
            "train.log_pairs_to": home / f"pairs-{run}", "tracking.uri": f"sqlite:///{home / 'mlruns.db'}",
            "tracking.log_model": "false", "deepspeed.config": REPO / "configs/deepspeed/zero2.json",
        }
        command = [str(BIN / "deepspeed"), "--hostfile", str(self.hostfile), "--no_ssh", f"--node_rank={node}",
                   "--master_addr", MASTER, f"--master_port={MASTER_PORT + self.runs}",
                   "--module", "pixelbert_dist.pretrain", "--config", str(TINY),
                   *(f"--{k}={v}" for k, v in settings.items()), *extra]
        with (tmp_path / f"node{node}-{run}.log").open("w") as log:
            return self.nodes.exec(node, command, cwd=home, env=_node_env(self.nodes, node), stdout=log,
                                   stderr=subprocess.STDOUT)

    def first_checkpoint(self, mirror: str, run: list[subprocess.Popen], logs) -> None:
        """Wait until the mirror holds a complete checkpoint; every process of `run` still running."""
        waiter = self.nodes.exec(1, [sys.executable, "-c", S3_HELPER, "wait", mirror, "240"],
                                 env=_node_env(self.nodes, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        while waiter.poll() is None:
            assert all(p.poll() is None for p in run), logs()
            time.sleep(0.1)
        assert waiter.returncode == 0, waiter.stderr.read()[-2000:] + logs()

    def resume_and_check(self, tmp_path: Path, mirror: str, extra: tuple[str, ...] = ()) -> dict:
        """Both nodes on fresh local folders with --resume auto: the run finishes the epoch. What
        it shows: the step it resumed at, the seconds to its first step, pairs lost and repeated."""
        resume_step = int(_s3(self.nodes, 0, "tags", mirror)[-1].removeprefix("step"))
        started = time.time()
        run2 = [self.start(tmp_path, n, "run2", mirror, ("--resume", "auto", *extra)) for n in (0, 1)]

        def logs() -> str:
            return "".join((tmp_path / f"node{n}-run2.log").read_text()[-3000:] for n in (0, 1))

        first_log = tmp_path / "node0" / "pairs-run2" / "rank0.jsonl"
        while not (first_log.exists() and first_log.read_text().strip()):
            assert all(p.poll() is None for p in run2), logs()
            assert time.time() - started < 240, "the resumed job trained no step"
            time.sleep(0.1)
        first_step_s = time.time() - started
        for proc in run2:
            proc.wait(timeout=300)
        assert [p.returncode for p in run2] == [0, 0], logs()
        log0 = (tmp_path / "node0-run2.log").read_text()
        assert f"at step {resume_step} " in log0 and "resumed from" in log0
        # every pair of the epoch once: steps before the checkpoint from run 1, the rest from run 2
        steps = self.total_pairs // 8
        before = [r for n in (0, 1) for r in _pairs(tmp_path / f"node{n}" / "pairs-run1") if r["step"] < resume_step]
        redone = [r for n in (0, 1) for r in _pairs(tmp_path / f"node{n}" / "pairs-run1") if r["step"] >= resume_step]
        after = [r for n in (0, 1) for r in _pairs(tmp_path / f"node{n}" / "pairs-run2")]
        seen = [tuple(p) for r in before + after for p in r["pairs"]]
        return {"resume_step": resume_step, "steps": steps, "first_step_s": first_step_s, "redone": len(redone),
                "repeated": len(seen) - len(set(seen)), "lost": self.total_pairs - len(set(seen)),
                "steps_after": {r["step"] for r in after}}

    def every_pair_once(self, result: dict) -> bool:
        return (result["repeated"] == 0 and result["lost"] == 0 and 0 < result["resume_step"] < result["steps"]
                and result["steps_after"] == set(range(result["resume_step"], result["steps"])))


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
def test_two_nodes_kill_minus_9_of_one_node_fails_the_job_at_once(cluster, tmp_path):
    """Node 1's rank killed: its sockets close and node 0 hears at once. The resume from the
    mirror on fresh nodes is the link-down test's (the same --resume auto, after the same kind of
    stop mid-epoch with a checkpoint upload possibly cut): one resume serves both."""
    mirror = "s3://ckpt/kill"

    def logs() -> str:
        return "".join((tmp_path / f"node{n}-run1.log").read_text()[-3000:] for n in (0, 1))

    # train until the mirror holds a complete checkpoint, then kill -9 node 1's rank
    import psutil
    run1 = [cluster.start(tmp_path, n, "run1", mirror) for n in (0, 1)]
    cluster.first_checkpoint(mirror, run1, logs)
    # the training process itself (its loader worker shares its command line): the launch's child
    [launch] = [p for p in psutil.Process(run1[1].pid).children() if "deepspeed.launcher.launch" in p.cmdline()]
    [victim] = launch.children()
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    run1[0].wait(timeout=120)
    fail_s = time.time() - killed_at
    run1[1].wait(timeout=60)
    complete = _s3(cluster.nodes, 0, "tags", mirror)
    from tests.faults import record_fault
    record_fault(dict(  # before the asserts: a failure is a row too
        fault="two nodes (network namespaces over veth): kill -9 of node 1's rank mid-epoch",
        what_was_done=(f"one deepspeed --no_ssh launcher per node, checkpoints every 2 steps mirrored to S3; "
                       f"node 1's rank killed after the first mirrored checkpoint: node 0 failed {fail_s:.1f} s later; "
                       f"the mirror's complete checkpoints: {', '.join(complete) or 'none'} (the resume from it: "
                       f"the link-down row)"),
        expected="both nodes exit non-zero, node 0 within 60 s (no hang); the mirror keeps a complete checkpoint",
        pairs_lost=None, pairs_repeated=None, recovery_s=round(fail_s, 1),
        passed=run1[0].returncode != 0 and run1[1].returncode != 0 and fail_s < 60 and bool(complete)))
    assert run1[0].returncode != 0, "node 0 ended well: the kill came after the epoch's end"
    assert run1[1].returncode != 0
    assert fail_s < 60, f"node 0 took {fail_s:.0f} s to fail"  # it noticed; no hang
    assert complete, logs()


COLLECTIVE_TIMEOUT_S = 12  # train.collective_timeout_s in the link-down test (also the rendezvous timeout)
# docs/faults.md: a lost node is found within the collective timeout plus the rank's work before
# its next collective (a step, a checkpoint write) and the launcher's exit; 15 s here
LOST_BOUND_S = COLLECTIVE_TIMEOUT_S + 15


@pytest.mark.slow
def test_two_nodes_a_link_down_is_found_within_the_collective_timeout_and_resume_auto_finishes(cluster, tmp_path):
    """Node 1's veth goes down mid-epoch: no socket is closed, packets just stop (a cable pulled,
    a kernel panic). Node 0's rank waits in its collective for train.collective_timeout_s, then
    stops, naming the step and what timed out; both nodes resume from the mirror. The wait is
    bounded in whichever collective node 0 is in: the per-step vote on the world group, or ZeRO's
    gradient reduction in backward on DeepSpeed's own copy of it (which once waited 30 minutes)."""
    mirror = "s3://ckpt/link"
    timeout = (f"--train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}",)

    def logs() -> str:
        return "".join((tmp_path / f"node{n}-run1.log").read_text()[-3000:] for n in (0, 1))

    run1 = [cluster.start(tmp_path, n, "run1", mirror, timeout) for n in (0, 1)]
    cluster.first_checkpoint(mirror, run1, logs)
    nodes = cluster.nodes
    _ip("-n", nodes.ns[1], "link", "set", nodes.veth[1], "down")
    down_at = time.time()
    try:
        try:
            run1[0].wait(timeout=LOST_BOUND_S + 60)
        except subprocess.TimeoutExpired:  # a hang: stopped here, and the row below says FAIL
            os.killpg(run1[0].pid, signal.SIGKILL)
            run1[0].wait(timeout=30)
        lost_s = time.time() - down_at
    finally:
        if run1[1].poll() is None:  # cut off from everything: it ends in its own time, or now
            os.killpg(run1[1].pid, signal.SIGKILL)
            run1[1].wait(timeout=30)
        _ip("-n", nodes.ns[1], "link", "set", nodes.veth[1], "up")
    log0 = (tmp_path / "node0-run1.log").read_text()
    said = [line for line in log0.splitlines() if "error: rank 0: lost the other ranks during step" in line]
    result = cluster.resume_and_check(tmp_path, mirror, (*timeout, "--checkpoint.every_steps=1000"))
    checks = {
        "node 0 failed": run1[0].returncode != 0,
        f"within the bound ({LOST_BOUND_S} s; took {lost_s:.1f} s)": lost_s < LOST_BOUND_S,
        "one line naming the step and what timed out": len(said) == 1 and "timed out" in said[0].lower(),
        "no traceback from node 0's rank": "Traceback" not in log0.split("lost the other ranks")[0][-20000:]
        and "[rank0]: Traceback" not in log0,
        "every pair once after --resume auto": cluster.every_pair_once(result),
    }
    from tests.faults import record_fault
    record_fault(dict(
        fault="two nodes: node 1's link taken down mid-epoch (no socket closed)",
        what_was_done=(f"`ip link set {nodes.veth[1]} down` in node 1's namespace after the first mirrored "
                       f"checkpoint, train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}: node 0's launcher exited "
                       f"{lost_s:.1f} s later ({said[0].split(': ', 1)[1][:160] if said else 'no line'}); link up, "
                       f"both nodes resumed with --resume auto from the mirror's step {result['resume_step']} of "
                       f"{result['steps']}"),
        expected=f"node 0 exits non-zero within the collective timeout (+{LOST_BOUND_S - COLLECTIVE_TIMEOUT_S} s) "
                 "with one line naming the step and what timed out, no traceback; the resumed job ends the epoch "
                 "with every pair once",
        pairs_lost=result["lost"], pairs_repeated=result["repeated"],
        recovery_s=round(lost_s + result["first_step_s"], 1), passed=all(checks.values())))
    assert all(checks.values()), ({k: v for k, v in checks.items() if not v}, said, log0[-3000:])
