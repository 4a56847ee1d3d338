"""A two-node Ray cluster on this machine (head + one more node), joined with --ray_address, as
README's multi-machine recipe does across machines.

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


def test_two_node_cluster_with_ray_address(tiny_llama, tmp_path):
    _require_unshare()
    ray_cli = RAY_CLI
    env = _cluster_env()
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    port = 47800
    args = base_args(
        tiny_llama,
        space,
        hist,
        "--num_trials",
        "3",
        "--num_workers",
        "2",
        "--ray_address",
        f"127.0.0.1:{port}",
        "--initial_samples",
        "none",
    )
    node = "--num-cpus 1 --disable-usage-stats"
    script = f"""
set -e
ip link set lo up
trap '{ray_cli} stop --force >/dev/null 2>&1' EXIT
{ray_cli} start --head --port {port} --include-dashboard=false {node} >/dev/null
{ray_cli} start --address 127.0.0.1:{port} {node}
{shlex.quote(sys.executable)} -m bo_search.acc_modelsize {" ".join(shlex.quote(a) for a in args)}
"""
    r = subprocess.run(["unshare", "-n", "bash", "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert "2 worker(s) on 2 Ray node(s)" in r.stdout
    rows = read_history(hist).rows
    assert sum(x.status == "completed" for x in rows) == 3


def test_gpus_all_on_a_cpu_head_survives_losing_a_node(tiny_llama, tmp_path):
    """README's cluster recipe: a head without GPUs, a node declaring 2 (logical) GPUs, --gpus all.
    Midway the GPU node is killed; its in-flight trials fail as "node lost", the search waits for
    room, and a third node (1 GPU) takes a replacement worker that finishes the search."""
    _require_unshare()
    from bo_search.search.workers import TEST_GPU_AS_CPU_ENV, TEST_TRIAL_DELAY_ENV

    ray_cli = RAY_CLI
    env = _cluster_env(fast_node_death=True)
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    port = 47820
    n_trials = 12
    args = base_args(
        tiny_llama, space, hist, "--num_trials", str(n_trials), "--gpus", "all", "--ray_address", f"127.0.0.1:{port}",
        "--initial_samples", "none", "--placement_timeout", "120",
    )  # fmt: skip
    node = "--disable-usage-stats"
    search = f"{TEST_GPU_AS_CPU_ENV}=1 {TEST_TRIAL_DELAY_ENV}=1.5 {shlex.quote(sys.executable)} -m bo_search.acc_modelsize " + " ".join(
        shlex.quote(a) for a in args
    )
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    script = f"""
set -e
ip link set lo up
trap '{ray_cli} stop --force >/dev/null 2>&1' EXIT
{ray_cli} start --head --port {port} --num-cpus 1 --num-gpus 0 --include-dashboard=false {node} >/dev/null
{ray_cli} start --address 127.0.0.1:{port} --num-cpus 2 --num-gpus 2 --node-manager-port 47911 {node} >/dev/null
{search} >{out} 2>{err} &
pid=$!
for i in $(seq 600); do
  n=$(grep -c completed {hist} 2>/dev/null || true)
  [ "${{n:-0}}" -ge 3 ] && break
  sleep 0.5
done
# the GPU node dies: its raylet and every process it started (the two workers); 4791[1] keeps
# this script's own command line out of the match
raylet=$(pgrep -f 'raylet.*node_manager_port=4791[1]' | head -1)
pkill -9 -P "$raylet" || true
kill -9 "$raylet"
echo "killed node at $(grep -c completed {hist}) completed"
sleep 8
{ray_cli} start --address 127.0.0.1:{port} --num-cpus 2 --num-gpus 1 {node} >/dev/null
rc=0
wait $pid || rc=$?
echo "search rc $rc"
exit $rc
"""
    r = subprocess.run(["unshare", "-n", "bash", "-c", script], env=env, capture_output=True, text=True, timeout=900)
    stdout, stderr = out.read_text(), err.read_text()
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:], stdout[-3000:], stderr[-3000:])
    assert "2 worker(s) on 1 Ray node(s), 0 on the driver's node" in stdout, stdout
    rows = read_history(hist).rows
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


def test_gpus_beyond_the_cluster_and_no_room_left(tiny_llama, tmp_path):
    """--gpus larger than the cluster is a one-line error naming what it has; a search whose only
    GPU node dies, with no node to replace it, stops after --placement_timeout with a clear message
    and keeps every completed trial."""
    _require_unshare()
    from bo_search.search.workers import TEST_GPU_AS_CPU_ENV, TEST_TRIAL_DELAY_ENV

    ray_cli = RAY_CLI
    env = _cluster_env(fast_node_death=True)
    space = tiny_space(tmp_path / "space.json")
    hist = tmp_path / "h.csv"
    port = 47840
    common = base_args(tiny_llama, space, hist, "--ray_address", f"127.0.0.1:{port}", "--initial_samples", "none")
    py = f"{TEST_GPU_AS_CPU_ENV}=1 {TEST_TRIAL_DELAY_ENV}=1 {shlex.quote(sys.executable)} -m bo_search.acc_modelsize " + " ".join(
        shlex.quote(a) for a in common
    )
    out, err, err3 = tmp_path / "out.txt", tmp_path / "err.txt", tmp_path / "err3.txt"
    script = f"""
set -e
ip link set lo up
trap '{ray_cli} stop --force >/dev/null 2>&1' EXIT
{ray_cli} start --head --port {port} --num-cpus 1 --num-gpus 0 --include-dashboard=false --disable-usage-stats >/dev/null
{ray_cli} start --address 127.0.0.1:{port} --num-cpus 1 --num-gpus 1 --node-manager-port 47931 --disable-usage-stats >/dev/null
rc3=0; {py} --num_trials 5 --gpus 3 >/dev/null 2>{err3} || rc3=$?
echo "gpus3 rc $rc3"
{py} --num_trials 40 --gpus 1 --placement_timeout 5 >{out} 2>{err} &
pid=$!
for i in $(seq 600); do
  n=$(grep -c completed {hist} 2>/dev/null || true)
  [ "${{n:-0}}" -ge 2 ] && break
  sleep 0.5
done
raylet=$(pgrep -f 'raylet.*node_manager_port=4793[1]' | head -1)
pkill -9 -P "$raylet" || true
kill -9 "$raylet"
rc=0
wait $pid || rc=$?
echo "search rc $rc"
"""
    r = subprocess.run(["unshare", "-n", "bash", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    e3 = err3.read_text()
    assert "gpus3 rc 2" in r.stdout and "--gpus 3: the Ray cluster has 1 GPU(s)" in e3 and "Traceback" not in e3, e3[-2000:]
    assert "search rc 3" in r.stdout, (r.stdout, out.read_text()[-2000:], err.read_text()[-3000:])
    stderr = err.read_text()
    assert "no worker could be placed on the Ray cluster for" in stderr and "Traceback" not in stderr, stderr[-3000:]
    rows = read_history(hist).rows
    done = [x for x in rows if x.status == "completed"]
    assert len(done) >= 2 and any(x.status == "failed" and x.reason.startswith("node lost") for x in rows)
