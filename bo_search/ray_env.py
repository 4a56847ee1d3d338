"""Keep a locally started Ray cluster on loopback: the one place for Ray's network workarounds.

With default settings Ray 2.60 reaches beyond the machine even when everything runs locally and
``include_dashboard=False``. ``tests/test_ray_env.py`` traces every ``connect``/``sendto``/
``sendmsg``/``bind`` of a real local cluster (driver, GCS, raylet, dashboard, and an actor that
imports torch) and proves that with :func:`apply_loopback_env` and :func:`local_init_kwargs`
nothing leaves 127.0.0.0/8, and that without them something does.

What Ray does without each variable (paths are under ``site-packages/ray/`` of Ray 2.60.0):

``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
    The IP probe. ``_private/services.py:811-821`` ``get_node_ip_address()`` calls
    ``node_ip_address_from_perspective()``, which does a UDP ``connect`` to ``8.8.8.8:53`` and
    ``[2001:4860:4860::8888]:53`` (C++ ``network_util.cc``), and the node then uses the public
    interface's address: Ray's servers bind to ``::`` (all interfaces) and talk over that address. With the
    flag off, the same function returns ``get_localhost_ip()`` (127.0.0.1) instead. The flag is read
    once, when ``ray`` is imported (``_private/ray_constants.py:657-661``), so it must be in the
    environment before ``import ray`` in this process; child processes inherit it.
    ``ray.init(_node_ip_address="127.0.0.1")`` is *not* a substitute: ``_private/worker.py:1843-1844``
    passes it through ``resolve_ip_for_localhost()``, which sends a loopback address straight back
    to the probe (measured: the node ended up on the public address).

``RAY_USAGE_STATS_ENABLED=0``
    Usage reports. When this is not exactly ``"0"`` (``_common/usage/usage_lib.py:353-395``) the
    dashboard's ``UsageStatsHead.run()`` (``dashboard/modules/usage_stats/usage_stats_head.py:195-212``)
    posts a report to ``https://usage-stats.ray.io/`` (``usage_lib.py:337-340``) after 60 s and then
    every hour; HTTPS, so the proxy below would not stop it. ``ray.init`` on a release wheel already
    forces it to ``"0"`` (``_private/worker.py:1878-1884``), but a nightly wheel does not; set here
    so that no Ray build depends on that.

``http_proxy`` / ``HTTP_PROXY`` = ``http://127.0.0.1:9``, ``no_proxy`` / ``NO_PROXY`` = ``127.0.0.1,localhost,::1``
    The cloud-metadata probe. ``UsageStatsHead.run()`` (``usage_stats_head.py:196-198``) calls
    ``get_cluster_config_to_report(os.path.expanduser("~/ray_bootstrap_config.yaml"))`` before it
    looks at ``RAY_USAGE_STATS_ENABLED``. When that file is missing (``usage_lib.py:818-835``) it
    calls ``get_cloud_from_metadata_requests()`` (``usage_lib.py:715-747``): plain-HTTP
    ``requests.get`` to ``169.254.169.254`` (Azure, AWS) and ``metadata.google.internal`` (GCP, so a
    DNS query too). The module loads even with ``include_dashboard=False``: ``node.py:1660-1669``
    always starts the API server and ``_private/services.py:1383-1386`` then passes
    ``--modules-to-load=UsageStatsHead``. No Ray setting turns it off. ``requests`` honours the proxy
    variables, so those requests go to a closed loopback port and fail at once; ``no_proxy`` keeps
    loopback direct. Ray's own gRPC ignores proxy variables (``grpc.enable_http_proxy`` is 0 unless
    ``RAY_grpc_enable_http_proxy`` is set, ``_private/ray_constants.py:597-603``), so Ray's internal
    traffic is unaffected. Chosen over the other known fix, pointing ``HOME`` at a directory holding
    a ``ray_bootstrap_config.yaml`` with ``provider: {type: local}``, because ``HOME`` is inherited by
    every worker (``~/.cache``, ``~/.ray/auth_token``, ...) while these variables only touch plain
    HTTP, which bo_search never uses (it runs offline, see ``bo_search/offline.py``).
    ``https_proxy`` is left alone; only its exception list (``no_proxy``) is replaced.

Every value is *forced*, not ``setdefault``: each user value would reopen a leak
(``RAY_USAGE_STATS_ENABLED=1`` turns reports on where ``ray.init`` does not force them off,
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` probes and
publishes the node on the public interface, an existing ``http_proxy`` would carry the metadata
requests off the machine, a ``no_proxy`` listing ``169.254.169.254`` would send them direct). A user
who wants Ray on real network interfaces runs a multi-node cluster with ``--ray_address``; that
path must not call :func:`apply_loopback_env`: with the cluster flag off, ``get_node_ip_address()``
in the driver returns 127.0.0.1, not the address its node has in the cluster (read from the code,
not tried on a real cluster).

``RAY_AUTH_MODE`` is deliberately left alone: it has no effect on where Ray connects (the traced
test passes with Ray's default token authentication), and turning authentication off would let any
local user drive the cluster's ports.

Intended use, in the one module that imports ray (``bo_search/search/workers.py``)::

    from bo_search.ray_env import apply_loopback_env, local_init_kwargs

    def start_local_ray(num_cpus: int, object_store_memory: int) -> None:
        apply_loopback_env()  # before `import ray`: ray reads the cluster flag at import
        import ray

        ray.init(**local_init_kwargs(num_cpus, object_store_memory))
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

# A closed loopback port: connection refused at once, and nothing can leave 127.0.0.0/8 even if
# something happens to listen there. Port 9 is "discard".
_DEAD_PROXY = "http://127.0.0.1:9"
_NO_PROXY = "127.0.0.1,localhost,::1"

# Ray refuses an object store smaller than this (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES).
_MIN_OBJECT_STORE_BYTES = 75 * 1024 * 1024


def loopback_env() -> dict[str, str]:
    """Environment variables that keep a locally started Ray cluster on loopback (see module doc)."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "http_proxy": _DEAD_PROXY,
        "HTTP_PROXY": _DEAD_PROXY,
        "no_proxy": _NO_PROXY,
        "NO_PROXY": _NO_PROXY,
    }


def apply_loopback_env(
    environ: MutableMapping[str, str] | None = None,
) -> dict[str, str | None]:
    """Force :func:`loopback_env` into ``environ`` (default ``os.environ``); return the old values.

    Call it before the first ``import ray`` in this process and only when starting a local cluster.
    Ray's processes (GCS, raylet, dashboard, workers) inherit the variables from this process.

    Raises:
        RuntimeError: ``environ`` is ``os.environ`` but ray was already imported with its cluster
            flag on, so this process would still probe 8.8.8.8 and pick a public node address.
    """
    if environ is None:
        environ = os.environ
    if environ is os.environ:
        constants = sys.modules.get("ray._private.ray_constants")
        if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
            raise RuntimeError(
                "ray was imported before bo_search.ray_env.apply_loopback_env(): ray read "
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER at import and would still probe 8.8.8.8 and put "
                "the node on a public address. Call apply_loopback_env() first and import ray after it."
            )
    previous: dict[str, str | None] = {}
    for name, value in loopback_env().items():
        previous[name] = environ.get(name)
        environ[name] = value
    return previous


def local_init_kwargs(
    num_cpus: int,
    object_store_memory: int,
    *,
    num_gpus: int | None = None,
    log_to_driver: bool = True,
) -> dict[str, object]:
    """Keyword arguments for ``ray.init`` that start a fresh single-machine cluster.

    - ``address="local"``: always start a new cluster; never join one named by ``RAY_ADDRESS`` or
      found in ``/tmp/ray/ray_current_cluster`` (``_private/worker.py:1686-1694``,
      ``_private/services.py:705-708``), which may span other machines.
    - ``include_dashboard=False``: no web UI (the API server with ``UsageStatsHead`` still starts;
      :func:`apply_loopback_env` handles it).
    - ``object_store_memory``: Ray would otherwise reserve about 30% of RAM in shared memory.
    - ``_node_ip_address`` is deliberately absent; see the module doc.

    The environment from :func:`apply_loopback_env` is what keeps the cluster on loopback; these
    arguments alone do not.
    """
    if num_cpus < 1:
        raise ValueError(f"num_cpus must be at least 1, got {num_cpus}")
    if object_store_memory < _MIN_OBJECT_STORE_BYTES:
        raise ValueError(
            f"object_store_memory must be at least {_MIN_OBJECT_STORE_BYTES} bytes (75 MiB, Ray's minimum), got {object_store_memory}"
        )
    kwargs: dict[str, object] = {
        "address": "local",
        "num_cpus": num_cpus,
        "object_store_memory": object_store_memory,
        "include_dashboard": False,
        "log_to_driver": log_to_driver,
    }
    if num_gpus is not None:
        if num_gpus < 0:
            raise ValueError(f"num_gpus must be 0 or more, got {num_gpus}")
        kwargs["num_gpus"] = num_gpus
    return kwargs
