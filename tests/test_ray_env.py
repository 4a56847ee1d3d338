"""Prove that a local Ray cluster started the bo_search way makes no connection outside loopback.

A small script starts what a search starts, the real way: a ``WorkerPool`` (``workers.start_ray``,
which applies ``bo_search.ray_env``) with one real ``TrialWorker`` that loads a tiny model and runs
one trial; then it shuts Ray down, all under ``strace -f``. The negative control starts Ray plainly
(no ``ray_env``) with a stand-in actor that imports torch. Every traced ``connect``,
``sendto``, ``sendmsg``, ``sendmmsg`` and ``bind`` that carries an IP address must name loopback
(127.0.0.0/8, ::1, ::ffff:127.x).

Where possible the script runs in a fresh network namespace (``unshare --net``, as root, else with
``--map-root-user``), so nothing can leave even if the configuration were wrong. The namespace gets
a veth pair and a default route that lead nowhere: without a non-loopback interface Ray skips its IP
probe entirely, so a loopback-only namespace would hide the very connection this test looks for.
Without namespaces the positive test runs in the normal namespace; the negative control (the same
script without the environment, which must show a non-loopback attempt) runs only inside one.

CI must install strace (Debian/Ubuntu: ``apt-get install -y strace iproute2``); with ``CI=true`` a
missing or unusable strace fails the test instead of skipping it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bo_search.ray_env import apply_loopback_env, local_init_kwargs, loopback_env

REPO_ROOT = Path(__file__).resolve().parents[1]
OBJECT_STORE_BYTES = 200 * 1024 * 1024
RUN_TIMEOUT_S = 300
TRACED = ("connect", "sendto", "sendmsg", "sendmmsg", "bind")
ACTOR_MARK = "ACTOR_RESULT"

SCRIPT = f"""
import sys

if sys.argv[1] == "apply":  # what a search does: the pool starts Ray and a real worker
    from bo_search.search.workers import WorkerPool
    from bo_search.trial import EvalConfig
    from bo_search.types import QuantPlan

    cfg = EvalConfig(checkpoint=sys.argv[2], eval_text="pydoc", eval_tokens=64, heldout_tokens=0, max_seqlen=32)
    pool = WorkerPool(cfg, num_workers=1, object_store_mb={OBJECT_STORE_BYTES // (1024 * 1024)})
    try:
        [slot] = pool.idle()
        pool.submit(slot, 0, QuantPlan())
        results = []
        while not results:
            results = pool.wait(timeout=1.0)
        print("{ACTOR_MARK}", results[0].status, flush=True)
    finally:
        pool.shutdown()
    sys.exit(0)

from bo_search.ray_env import local_init_kwargs

import ray

ray.init(**local_init_kwargs(num_cpus=1, object_store_memory={OBJECT_STORE_BYTES}))


@ray.remote(num_cpus=1)
class TorchActor:
    def value(self):
        import torch

        return int(torch.arange(4).sum())


try:
    actor = TorchActor.remote()
    print("{ACTOR_MARK}", ray.get(actor.value.remote(), timeout=180), flush=True)
finally:
    ray.shutdown()
"""

# A network that looks real to Ray (an interface with a private address and a default route) but
# is a veth pair whose both ends stay inside the namespace: packets sent "out" are dropped.
FAKE_UPLINK = """set -e
ip link set lo up
ip link add bo0 type veth peer name bo1
ip addr add 10.200.0.1/24 dev bo0
ip link set bo0 up
ip link set bo1 up
ip route add default via 10.200.0.2 dev bo0
ip -6 addr add fd00:b0::1/64 dev bo0 nodad 2>/dev/null && ip -6 route add default via fd00:b0::2 dev bo0 2>/dev/null || true
"""
LOOPBACK_ONLY = "set -e\nip link set lo up\n"


@dataclasses.dataclass(frozen=True)
class Isolation:
    """How the traced script is run: a command prefix and the shell setup run inside it."""

    prefix: tuple[str, ...]
    setup: str
    description: str


@dataclasses.dataclass(frozen=True)
class TraceCall:
    syscall: str
    addresses: tuple[str, ...]
    line: str


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _require_strace() -> str:
    """Path to a working strace; skip locally, fail in CI, when there is none."""
    strace = shutil.which("strace")
    if strace is None:
        problem = "strace is not installed"
    else:
        probe = subprocess.run(
            [strace, "-f", "-o", os.devnull, "true"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode == 0:
            return strace
        problem = f"strace cannot trace here (ptrace blocked?): {probe.stderr.strip()}"
    message = f"{problem}; CI must install it: apt-get install -y strace"
    if _in_ci():
        pytest.fail(message)
    pytest.skip(message)


def _find_isolation() -> Isolation | None:
    """The best available network namespace, or None when namespaces cannot be created here."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    if os.geteuid() == 0:
        prefix: tuple[str, ...] = ("unshare", "--net")
    else:
        prefix = ("unshare", "--map-root-user", "--net")
    for setup, description in (
        (FAKE_UPLINK, f"`{' '.join(prefix)}` with a veth uplink that leads nowhere"),
        (LOOPBACK_ONLY, f"`{' '.join(prefix)}` with loopback only"),
    ):
        try:
            probe = subprocess.run(
                [*prefix, "sh", "-c", setup],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if probe.returncode == 0:
            return Isolation(prefix, setup, description)
    return None


@pytest.fixture(scope="module")
def isolation() -> Isolation | None:
    return _find_isolation()


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ray_loopback") / "start_ray.py"
    path.write_text(SCRIPT)
    return path


def _child_env() -> dict[str, str]:
    """This environment minus the loopback variables, so only the script's own choice counts."""
    strip = set(loopback_env())
    env = {k: v for k, v in os.environ.items() if k not in strip}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _run_traced(
    strace: str, script: Path, mode: str, isolation: Isolation | None, trace_file: Path, *script_args: str
) -> subprocess.CompletedProcess[str]:
    traced = [
        strace,
        "-f",
        "-qq",
        "-e",
        "trace=" + ",".join(TRACED),
        "-o",
        str(trace_file),
        sys.executable,
        str(script),
        mode,
        *script_args,
    ]
    if isolation is not None:
        command = [
            *isolation.prefix,
            "sh",
            "-c",
            isolation.setup + 'exec "$@"\n',
            "sh",
            *traced,
        ]
    else:
        command = traced
    proc = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=_child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"traced Ray script ran over {RUN_TIMEOUT_S} s; output:\n{output[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, output, None)


_CALL = re.compile(r"^\d+\s+(" + "|".join(TRACED) + r")\(")
_IPV4 = re.compile(r'inet_addr\("([^"]*)"\)')
_IPV6 = re.compile(r'inet_pton\(AF_INET6,\s*"([^"]*)"')


def parse_trace(text: str) -> list[TraceCall]:
    """Traced calls that carry an IP address (or claim an IP family but could not be parsed)."""
    calls = []
    for line in text.splitlines():
        match = _CALL.match(line)
        if match is None:  # "<... connect resumed>" halves carry no address
            continue
        addresses = tuple(_IPV4.findall(line) + _IPV6.findall(line))
        if addresses or "AF_INET" in line:
            calls.append(TraceCall(match.group(1), addresses, line))
    return calls


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped in ipaddress.ip_network("127.0.0.0/8")
        return ip == ipaddress.IPv6Address("::1")
    return ip in ipaddress.ip_network("127.0.0.0/8")


def offending(calls: list[TraceCall]) -> list[TraceCall]:
    """Calls naming any non-loopback address; an unparsed IP call counts as offending."""
    return [c for c in calls if not c.addresses or not all(map(is_loopback, c.addresses))]


def _describe(calls: list[TraceCall], limit: int = 40) -> str:
    lines = [f"  {c.line[:300]}" for c in calls[:limit]]
    if len(calls) > limit:
        lines.append(f"  ... and {len(calls) - limit} more")
    return "\n".join(lines)


@pytest.mark.slow
def test_local_ray_stays_on_loopback(script: Path, isolation: Isolation | None, tmp_path: Path, tiny_llama: Path) -> None:
    strace = _require_strace()
    trace_file = tmp_path / "ray.strace"
    result = _run_traced(strace, script, "apply", isolation, trace_file, str(tiny_llama))
    where = isolation.description if isolation else "the normal network namespace"
    assert result.returncode == 0 and f"{ACTOR_MARK} completed" in result.stdout, (
        f"traced Ray script failed (exit {result.returncode}) in {where}; output:\n{result.stdout[-4000:]}"
    )

    calls = parse_trace(trace_file.read_text(errors="replace"))
    bad = offending(calls)
    loopback_connects = [c for c in calls if c.syscall == "connect" and c not in bad]
    assert loopback_connects, (
        f"strace saw no loopback connect at all ({len(calls)} IP calls in {trace_file}): the trace "
        "did not capture Ray's traffic, so it proves nothing"
    )
    assert not bad, (
        f"Ray, started by a bo_search WorkerPool in {where}, made {len(bad)} socket call(s) naming a "
        f"non-loopback address (full trace: {trace_file}):\n{_describe(bad)}"
    )


@pytest.mark.slow
def test_negative_control_without_loopback_env_is_caught(script: Path, isolation: Isolation | None, tmp_path: Path) -> None:
    """Without the environment Ray must show a non-loopback attempt: proof the test can fail."""
    strace = _require_strace()
    if isolation is None:
        pytest.skip("no network namespace available; the control never runs un-isolated")
    trace_file = tmp_path / "ray-no-env.strace"
    result = _run_traced(strace, script, "no-env", isolation, trace_file)
    assert result.returncode == 0 and f"{ACTOR_MARK} 6" in result.stdout, (
        f"control script failed (exit {result.returncode}) in {isolation.description}; output:\n{result.stdout[-4000:]}"
    )
    calls = parse_trace(trace_file.read_text(errors="replace"))
    bad = [c for c in offending(calls) if c.syscall != "bind"]
    assert bad, (
        f"without bo_search.ray_env Ray made no non-loopback attempt in {isolation.description}, "
        f"so test_local_ray_stays_on_loopback could not fail either ({len(calls)} IP calls "
        f"traced in {trace_file})"
    )


def test_trace_parser_and_loopback_rules() -> None:
    """Fast check of the parsing the slow tests rely on, on lines as strace prints them."""
    v4 = "sa_family=AF_INET, sin_port=htons(53), sin_addr=inet_addr"
    v6 = "sa_family=AF_INET6, sin6_port=htons(1), sin6_flowinfo=htonl(0), inet_pton(AF_INET6,"
    lines = [
        f'11  connect(8, {{{v4}("8.8.8.8")}}, 16) = 0',
        f'11  connect(9, {{{v6} "::ffff:127.0.0.1", &sin6_addr)}}, 28 <unfinished ...>',
        "12  <... connect resumed>) = 0",
        f'13  bind(3, {{{v6} "::", &sin6_addr), sin6_scope_id=0}}, 28) = 0',
        '14  connect(4, {sa_family=AF_UNIX, sun_path="/tmp/x"}, 110) = 0',
        f'15  sendto(5, "x", 1, 0, {{{v4}("127.8.9.1")}}, 16) = 1',
    ]
    trace = "\n".join(lines)
    calls = parse_trace(trace)
    assert [c.syscall for c in calls] == ["connect", "connect", "bind", "sendto"]
    assert [c.addresses for c in offending(calls)] == [("8.8.8.8",), ("::",)]
    assert is_loopback("::1") and is_loopback("127.255.0.1") and is_loopback("::ffff:127.0.0.2")
    assert not any(map(is_loopback, ["10.0.0.1", "0.0.0.0", "::", "::ffff:10.0.0.1", "x"]))


def test_apply_loopback_env_forces_values_and_returns_previous() -> None:
    environ = {
        "http_proxy": "http://proxy.corp:3128",
        "RAY_USAGE_STATS_ENABLED": "1",
        "X": "y",
    }
    previous = apply_loopback_env(environ)
    assert environ == {**loopback_env(), "X": "y"}
    assert previous["http_proxy"] == "http://proxy.corp:3128"
    assert previous["RAY_USAGE_STATS_ENABLED"] == "1"
    assert previous["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] is None


def test_apply_loopback_env_refuses_after_ray_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stale = types.SimpleNamespace(ENABLE_RAY_CLUSTER=True)
    monkeypatch.setitem(sys.modules, "ray._private.ray_constants", stale)
    with pytest.raises(RuntimeError, match="before"):
        apply_loopback_env()
    child = {"X": "y"}
    previous = apply_loopback_env(child)  # a separate mapping (a child's environment) is always fine
    assert child == {**loopback_env(), "X": "y"} and previous == dict.fromkeys(loopback_env())


def test_local_init_kwargs() -> None:
    kwargs = local_init_kwargs(2, OBJECT_STORE_BYTES)
    assert kwargs == {
        "address": "local",
        "num_cpus": 2,
        "object_store_memory": OBJECT_STORE_BYTES,
        "include_dashboard": False,
        "log_to_driver": True,
    }
    assert local_init_kwargs(1, OBJECT_STORE_BYTES, num_gpus=1)["num_gpus"] == 1
    with pytest.raises(ValueError, match="num_cpus"):
        local_init_kwargs(0, OBJECT_STORE_BYTES)
    with pytest.raises(ValueError, match="75 MiB"):
        local_init_kwargs(1, 1024)
