"""Joining a Ray cluster, or starting Ray on this machine, for every command that runs work on Ray
(`tfsearch run`, `tfsearch predict --address`)."""

from __future__ import annotations

import os
import socket

from tfsearch.errors import InputError


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail within seconds, naming the address, when nothing listens there (ray.init would wait long)."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--address {address}: expected HOST:PORT (or ray://HOST:PORT)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise InputError(f"--address {address}: no Ray cluster reachable there ({exc})") from None


def connect(address: str | None, quiet: bool) -> None:
    """Join a cluster, or start Ray on this machine with the dashboard on 127.0.0.1."""
    import ray  # here, not at the top: predict imports this module and runs without Ray unless --address

    # Tune warns on every checkpoint of short milestones; the console view reports progress instead
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0, no Tune tables on the console
    if ray.is_initialized():
        return
    env = {"env_vars": {k: os.environ[k] for k in ("WANDB_MODE",) if k in os.environ}}
    # trial output (one line per trial and milestone) reaches this console and `ray job logs`
    logs = {"runtime_env": env, "log_to_driver": not quiet}
    if address:
        check_reachable(address)
        context = ray.init(address=address, **logs)
    else:
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", **logs)
    url = getattr(context, "dashboard_url", None)
    if url and not quiet:
        print(f"Ray dashboard: http://{url}", flush=True)
