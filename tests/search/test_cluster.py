"""A two-node Ray cluster on this machine (head + one more node), joined with --ray_address, as
README's multi-machine recipe does across machines.

One cluster serves the three scenarios (``cluster`` fixture, one script): its start costs once. In
order: a search on the head and a CPU node; a GPU node joins, a --gpus all search loses it midway
and a third node takes over; then --gpus beyond the cluster is refused, and a search whose only
GPU node dies stops after --placement_timeout. Each test asserts on its scenario's outputs.

Multi-node Ray needs its cluster mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1), in which Ray probes a
public address to find its own IP. So this test runs inside a private network namespace that has
only a loopback interface (``unshare -n``): nothing can leave the machine, the probe fails and Ray
falls back to 127.0.0.1.
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
from clitools import base_args, tiny_space

from bo_search.ray_env import loopback_env
from bo_search.search.history import read_history

pytestmark = pytest.mark.slow


def _can_unshare() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


def _require_unshare() -> None:
    if not _can_unshare():
        msg = "needs unshare -n (root) and ip (iproute2) to isolate the cluster's network"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI must provide them (apt-get install -y util-linux iproute2, run as root)")
        pytest.skip(msg)


RAY_CLI = str(Path(sys.executable).parent / "ray")


def _cluster_env(fast_node_death: bool = False) -> dict[str, str]:
    """The environment of a throwaway cluster in a private network namespace: loopback only, token
    auth off (nothing else can reach it); optionally a lost node noticed within seconds (Ray's
    defaults: 5 missed health checks, 3 s apart)."""
    env = {**os.environ, **loopback_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled"}
    if fast_node_death:
        env.update({"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"})
    env.pop("RAY_ADDRESS", None)
    return env


class Cluster(NamedTuple):
    run: subprocess.CompletedProcess  # the whole script: scenario markers on stdout
    folder: Path  # per scenario N: hN.csv, outN.txt, errN.txt (and err3gpus.txt)

    def context(self) -> tuple[str, str]:
        return self.run.stdout[-2000:], self.run.stderr[-3000:]


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    _require_unshare()
    from bo_search.search.workers import TEST_GPU_AS_CPU_ENV, TEST_TRIAL_DELAY_ENV

    ray_cli = RAY_CLI
    env = _cluster_env(fast_node_death=True)  # a lost node noticed within seconds (scenarios 2 and 3)
    d = tmp_path_factory.mktemp("cluster")
    space = tiny_space(d / "space.json")
    port = 47800
    address = f"127.0.0.1:{port}"

    def search(n: int, *extra: str, fake_gpus: str = "") -> str:
        args = base_args(tiny_llama, space, d / f"h{n}.csv", "--ray_address", address, "--initial_samples", "none", *extra)
        return f"{fake_gpus}{shlex.quote(sys.executable)} -m bo_search.acc_modelsize " + " ".join(shlex.quote(a) for a in args)

    gpu1 = f"{TEST_GPU_AS_CPU_ENV}=1 {TEST_TRIAL_DELAY_ENV}=1.5 "
    gpu3 = f"{TEST_GPU_AS_CPU_ENV}=1 {TEST_TRIAL_DELAY_ENV}=1 "
    node = "--disable-usage-stats"
    script = f"""
set -e
ip link set lo up
trap '{ray_cli} stop --force >/dev/null 2>&1' EXIT
wait_completed() {{  # until history $1 has $2 completed rows
  for i in $(seq 600); do
    n=$(grep -c completed "$1" 2>/dev/null || true)
    [ "${{n:-0}}" -ge "$2" ] && return 0
    sleep 0.5
  done
}}
kill_node() {{  # a node dies: its raylet (found by its node manager port, $1) and every process it started
  raylet=$(pgrep -f "raylet.*node_manager_port=$1" | head -1)
  pkill -9 -P "$raylet" || true
  kill -9 "$raylet"
}}
{ray_cli} start --head --port {port} --num-cpus 1 --num-gpus 0 --include-dashboard=false {node} >/dev/null
{ray_cli} start --address {address} --num-cpus 1 --num-gpus 0 {node} >/dev/null
set +e

# 1: two CPU workers, one on the head and one on the other node
{search(1, "--num_trials", "3", "--num_workers", "2")} >{d}/out1.txt 2>{d}/err1.txt
echo "scenario 1 rc $?"

# 2: a node declaring 2 (logical) GPUs, --gpus all; midway the GPU node is killed; its in-flight
# trials fail as "node lost", the search waits for room, and a third node (1 GPU) takes a
# replacement worker that finishes the search
{ray_cli} start --address {address} --num-cpus 2 --num-gpus 2 --node-manager-port 47911 {node} >/dev/null
{search(2, "--num_trials", "12", "--gpus", "all", "--placement_timeout", "120", fake_gpus=gpu1)} >{d}/out2.txt 2>{d}/err2.txt &
pid=$!
wait_completed {d}/h2.csv 3
kill_node '4791[1]'  # [1]: keeps this script's own command line out of the match
echo "killed node at $(grep -c completed {d}/h2.csv) completed"
sleep 8
{ray_cli} start --address {address} --num-cpus 2 --num-gpus 1 --node-manager-port 47931 {node} >/dev/null
wait $pid
echo "scenario 2 rc $?"

# 3: the cluster now has 1 GPU: --gpus 3 is refused; a --gpus 1 search loses its only GPU node,
# with no node to replace it
{search(3, "--num_trials", "5", "--gpus", "3", fake_gpus=gpu3)} >/dev/null 2>{d}/err3gpus.txt
echo "gpus3 rc $?"
{search(3, "--num_trials", "40", "--gpus", "1", "--placement_timeout", "5", fake_gpus=gpu3)} >{d}/out3.txt 2>{d}/err3.txt &
pid=$!
wait_completed {d}/h3.csv 2
kill_node '4793[1]'
wait $pid
echo "search rc $?"
exit 0
"""
    r = subprocess.run(["unshare", "-n", "bash", "-c", script], env=env, capture_output=True, text=True, timeout=900)
    return Cluster(r, d)


def test_two_node_cluster_with_ray_address(cluster):
    r, d = cluster.run, cluster.folder
    assert r.returncode == 0 and "scenario 1 rc 0" in r.stdout, (cluster.context(), (d / "err1.txt").read_text()[-3000:])
    stdout = (d / "out1.txt").read_text()
    assert "2 worker(s) on 2 Ray node(s)" in stdout
    rows = read_history(d / "h1.csv").rows
    assert sum(x.status == "completed" for x in rows) == 3


def test_gpus_all_on_a_cpu_head_survives_losing_a_node(cluster):
    """README's cluster recipe: a head without GPUs, a node declaring 2 (logical) GPUs, --gpus all.
    Midway the GPU node is killed; its in-flight trials fail as "node lost", the search waits for
    room, and a third node (1 GPU) takes a replacement worker that finishes the search."""
    r, d = cluster.run, cluster.folder
    n_trials = 12
    stdout, stderr = (d / "out2.txt").read_text(), (d / "err2.txt").read_text()
    assert r.returncode == 0 and "scenario 2 rc 0" in r.stdout, (cluster.context(), stdout[-3000:], stderr[-3000:])
    assert "2 worker(s) on 1 Ray node(s), 0 on the driver's node" in stdout, stdout
    rows = read_history(d / "h2.csv").rows
    evaluated = [x for x in rows if x.status in ("completed", "failed")]
    assert len(evaluated) == n_trials  # nothing completed is lost; the lost trials count as evaluated
    lost = [x for x in rows if x.status == "failed"]
    assert lost and all(x.reason.startswith("node lost") for x in lost), [(x.status, x.reason) for x in lost]
    nodes = {x.worker_id.split("@")[1].split(":")[0] for x in evaluated if x.status == "completed"}
    assert len(nodes) == 2, nodes  # the killed node, then the replacement's
    first, last = evaluated[0].worker_id, [x for x in evaluated if x.status == "completed"][-1].worker_id
    assert first.split(":")[1].startswith("gpu") and last.split(":")[1].startswith("gpu")
    assert first.split("@")[1].split(":")[0] != last.split("@")[1].split(":")[0]
    assert "trial(s) failed with their node lost" in stdout


def test_gpus_beyond_the_cluster_and_no_room_left(cluster):
    """--gpus larger than the cluster is a one-line error naming what it has; a search whose only
    GPU node dies, with no node to replace it, stops after --placement_timeout with a clear message
    and keeps every completed trial."""
    r, d = cluster.run, cluster.folder
    assert r.returncode == 0, cluster.context()
    e3 = (d / "err3gpus.txt").read_text()
    assert "gpus3 rc 2" in r.stdout and "--gpus 3: the Ray cluster has 1 GPU(s)" in e3 and "Traceback" not in e3, e3[-2000:]
    assert "search rc 3" in r.stdout, (r.stdout, (d / "out3.txt").read_text()[-2000:], (d / "err3.txt").read_text()[-3000:])
    stderr = (d / "err3.txt").read_text()
    assert "no worker could be placed on the Ray cluster for" in stderr and "Traceback" not in stderr, stderr[-3000:]
    rows = read_history(d / "h3.csv").rows
    done = [x for x in rows if x.status == "completed"]
    assert len(done) >= 2 and any(x.status == "failed" and x.reason.startswith("node lost") for x in rows)
