"""launch/multinode.sh: 2 nodes x 1 process on one machine, as two network namespaces.

Each "node" is a network namespace with one end of a veth pair and an address in a private
range created only inside these namespaces; the nodes meet through c10d rendezvous hosted by
node 0 and train over gloo on the veth link. The namespaces (and with them the veth pair) are
deleted at the end, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from test_launch_helpers import REPO, final_accuracy, read_metrics

SCRIPT = REPO / "launch" / "multinode.sh"
TIMEOUT_S = 240


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _netns_usable() -> str | None:
    """None when ``ip netns`` works here, else why not."""
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    probe = f"no-probe-{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def two_nodes():
    """Two namespaces joined by a veth pair: yields [(namespace, interface, address)] x 2."""
    reason = _netns_usable()
    if reason:
        pytest.skip(reason)
    tag = os.getpid() % 100000
    subnet = f"10.{200 + tag % 50}.{tag % 250}"
    nodes = [(f"no-node{i}-{tag}", f"nov{i}x{tag}", f"{subnet}.{i + 1}") for i in range(2)]
    try:
        for ns, _, _ in nodes:
            _ip("netns", "add", ns)
        _ip("link", "add", nodes[0][1], "type", "veth", "peer", "name", nodes[1][1])
        for ns, dev, addr in nodes:
            _ip("link", "set", dev, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield nodes
    finally:
        for ns, dev, _ in nodes:
            _ip("netns", "del", ns, check=False)  # removes the veth end inside it as well
        for _, dev, _ in nodes:
            _ip("link", "del", dev, check=False)  # only if creation stopped half-way


def test_two_namespaces_train_as_two_nodes(two_nodes, tmp_path):
    endpoint = f"{two_nodes[0][2]}:29731"
    train_args = ["--epochs", "1", "--subset", "128", "--test-subset", "64", "--batch-size", "16",
                  "--no-progress", "--out", str(tmp_path / "run")]
    procs = []
    for rank, (ns, dev, addr) in enumerate(two_nodes):
        env = dict(os.environ, GLOO_SOCKET_IFNAME=dev, OMP_NUM_THREADS="1",
                   PYTHON=sys.executable)
        command = ["ip", "netns", "exec", ns, "bash", str(SCRIPT), "--nnodes", "2",
                   "--node-rank", str(rank), "--endpoint", endpoint, "--local-addr", addr,
                   "--rdzv-id", f"test-{os.getpid()}", "--", *train_args]
        procs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {rank} failed:\n{out[-4000:]}"
    # c10d rendezvous, not --node-rank, decides which node holds global rank 0 (which reports).
    reporting = [out for out in outputs if "final test accuracy" in out]
    assert len(reporting) == 1, "\n----\n".join(out[-2000:] for out in outputs)
    assert "on 2 rank(s)" in reporting[0]
    accuracy = final_accuracy(reporting[0])
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 1 and metrics[0]["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert metrics[0]["steps"] == 128 // 32  # global batch 2 x 16: both nodes took part
