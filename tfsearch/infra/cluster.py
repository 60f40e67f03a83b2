"""Joining a Ray cluster, or starting Ray on this machine, for every command that runs work on Ray
(`tfsearch run`, `tfsearch predict --address`)."""

from __future__ import annotations

import os
import socket
import sys

from tfsearch.errors import InputError
from tfsearch.infra.tracking import WANDB_ENV_VARS

GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
JOIN_WAIT_S = 5
TOKEN_ENV, AUTH_MODE_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"  # Ray's token authentication (Ray >= 2.59)
# Ray Tune warns of any of its steps slower than this many seconds (default 0.5, read when ray.tune is
# imported). At each trial's first result W&B's callback waits seconds for the trial's logging actor to
# start, and Tune warned of it for every trial; a step slower than a minute is still reported.
TUNE_SLOW_ENV, TUNE_SLOW_S = "TUNE_WARN_THRESHOLD_S", "60"


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
    quiet_slow_step_warnings()
    if ray.is_initialized():
        return
    # the W&B settings of this driver (and Tune's, for a Tune run through Ray Client) reach every worker
    env = {"env_vars": {k: os.environ[k] for k in (*WANDB_ENV_VARS, TUNE_SLOW_ENV) if k in os.environ}}
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


def quiet_slow_step_warnings() -> None:
    """Raise Ray Tune's slow-step warning threshold to `TUNE_SLOW_S` unless `TUNE_WARN_THRESHOLD_S` is set:
    in the environment, for what imports Ray Tune later, and in `warn_if_slow` if this process imported it
    already (Tune reads the variable once, at import; each warning reads the class's value)."""
    threshold = os.environ.setdefault(TUNE_SLOW_ENV, TUNE_SLOW_S)
    util = sys.modules.get("ray.tune.utils.util")
    if util is not None:
        util.warn_if_slow.DEFAULT_THRESHOLD = float(threshold)


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
