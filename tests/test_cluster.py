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
from test_search import base_args, tiny_space

from bo_search.history import read_history
from bo_search.ray_env import loopback_env

pytestmark = pytest.mark.slow


def _can_unshare() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


def test_two_node_cluster_with_ray_address(tiny_llama, tmp_path):
    if not _can_unshare():
        msg = "needs unshare -n (root) and ip (iproute2) to isolate the cluster's network"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + "; CI must provide them (apt-get install -y util-linux iproute2, run as root)")
        pytest.skip(msg)
    ray_cli = str(Path(sys.executable).parent / "ray")
    # token auth off: this throwaway cluster lives in a namespace nothing else can reach
    env = {**os.environ, **loopback_env(), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
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
