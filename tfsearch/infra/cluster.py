"""Joining a Ray cluster, or starting Ray on this machine, for every command that runs work on Ray
(`tfsearch run`, `tfsearch predict --address`)."""

from __future__ import annotations

import os
import socket

from tfsearch.errors import InputError

GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
JOIN_WAIT_S = 5
TOKEN_ENV, AUTH_MODE_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"  # Ray's token authentication (Ray >= 2.59)


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
        # Ray retries a refused join once a second for 20 s (RAY_gcs_server_port_wait_time_s, Ray's own
        # setting, read when it joins): a reachable port that refuses us fails within seconds instead
        wait = os.environ.setdefault(GCS_WAIT_ENV, str(JOIN_WAIT_S))
        try:
            context = ray.init(address=address, **logs)
        except (ConnectionError, RuntimeError) as exc:
            raise InputError(join_refused(address, exc)) from None
        finally:
            if wait == str(JOIN_WAIT_S):
                os.environ.pop(GCS_WAIT_ENV, None)
    else:
        context = ray.init(include_dashboard=True, dashboard_host="127.0.0.1", **logs)
    url = getattr(context, "dashboard_url", None)
    if url and not quiet:
        print(f"Ray dashboard: http://{url}", flush=True)


def join_refused(address: str, exc: BaseException) -> str:
    """Why joining the cluster at `address` failed, naming the flag (and the token when that is why)."""
    causes = [exc]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    if any("AuthenticationError" in type(e).__name__ or "InvalidAuthToken" in str(e) for e in causes):
        return (
            f"--address {address}: the Ray cluster there refused this driver's token; set {TOKEN_ENV} (or"
            f" {TOKEN_ENV}_PATH) to the token its head was started with (with {AUTH_MODE_ENV}=token)"
        )
    reason = str(causes[-1]).strip().splitlines()[0] if str(causes[-1]).strip() else type(causes[-1]).__name__
    return f"--address {address}: cannot join the Ray cluster there ({reason})"
