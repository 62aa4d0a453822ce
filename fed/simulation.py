"""Run a federated training on one machine with Flower's simulation engine (Ray).

Every configured site becomes a virtual SuperNode (``partition-id`` = its index in
``data.sites``) running the same ClientApp a real hospital would run; the ServerApp drives the
rounds in a thread of this process. Ray's temp dir lives under the run directory (or a short
path when the run path is too long for Ray's sockets), telemetry and update checks are off,
and Ray is shut down before returning, so no process is left behind. If the Simulation
Runtime dies (e.g. Ray cannot start), the ServerApp thread stops at its next wait for replies
instead of waiting out the round timeout and then committing an empty round.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from synthct.checkpoint import Generator
from synthct.config import SynthctConfig
from synthct.fed.errors import FederatedError
from synthct.fed.sites import PromptGrid

__all__ = ["simulate", "train_federated", "quiet_flower_environment"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

# Ray puts unix sockets under its temp dir; their paths must stay below 108 bytes.
_RAY_SOCKET_HEADROOM = 72  # "/session_<date>_<time>_<pid>/sockets/plasma_store"


def quiet_flower_environment() -> None:
    """No telemetry, no update checks, no Ray usage stats: this process never phones home."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning
    flwr_logger = logging.getLogger("flwr")
    if not any(isinstance(f, _KnownNoise) for f in flwr_logger.filters):
        flwr_logger.addFilter(_KnownNoise())


class _KnownNoise(logging.Filter):
    """Drop Flower messages about choices synthct makes on purpose: strategies run with
    ``fraction_evaluate=0`` (synthct evaluates the final model itself), and the simulation is
    started with ``run_simulation``."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        # run_simulation is deprecated in favour of `flwr run`, which needs an installed app
        # dir; synthct runs the same apps through both (see fed/deployment.py)
        return (
            "fraction_evaluate is set to 0.0" not in text
            and "run_simulation" not in text
            and "This is a deprecated feature" not in text
        )


def _ray_temp_dir(run_dir: Path) -> tuple[Path, bool]:
    """``RUN/ray`` if short enough for Ray's socket paths, else a short temp dir (removed)."""
    preferred = run_dir / "ray"
    if len(str(preferred)) + _RAY_SOCKET_HEADROOM < 108:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred, False
    short = Path(tempfile.mkdtemp(prefix="synthct-ray-"))
    logger.info("run path too long for Ray sockets; Ray temp dir is %s", short)
    return short, True


def require_gpus(client_gpus: float) -> None:
    """Refuse GPU shares on a machine without CUDA (Ray would wait for them for ever)."""
    if client_gpus <= 0:
        return
    import torch

    if not torch.cuda.is_available():
        raise FederatedError(
            f"federated.num_gpus is {client_gpus} but this machine has no CUDA GPU; "
            "set it to 0 to simulate the sites on the CPU"
        )


def simulate(
    server_main: Callable[..., T],
    client_app,  # noqa: ANN001 - a flwr ClientApp
    *,
    num_sites: int,
    run_dir: Path,
    client_cpus: int = 1,
    client_gpus: float = 0.0,
) -> T:
    """Run ``server_main(grid)`` as a ServerApp against ``num_sites`` virtual SuperNodes running
    ``client_app`` (each reserving ``client_cpus`` CPUs and ``client_gpus`` of a GPU); returns
    what ``server_main`` returned. Ray is shut down afterwards."""
    require_gpus(client_gpus)
    quiet_flower_environment()
    import ray
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    flwr_logger = logging.getLogger("flwr")
    if flwr_logger.level < logging.WARNING and not logger.isEnabledFor(logging.DEBUG):
        flwr_logger.setLevel(logging.WARNING)  # per-round INFO chatter; our logs have it all
    result: dict[str, T] = {}
    server_app = ServerApp()

    stopped = threading.Event()

    @server_app.main()
    def _main(grid: Grid, context) -> None:  # noqa: ANN001 - Flower's Context
        result["value"] = server_main(
            PromptGrid(grid, pull_interval=grid.pull_interval, stopped=stopped)
        )

    cpus = os.cpu_count() or 1
    ray_dir, remove_ray_dir = _ray_temp_dir(run_dir)
    backend_config = {
        "client_resources": {"num_cpus": min(client_cpus, cpus), "num_gpus": float(client_gpus)},
        "init_args": {
            "num_cpus": cpus,
            "_temp_dir": str(ray_dir),
            "include_dashboard": False,
            "logging_level": "ERROR",
            "log_to_driver": False,
        },
    }
    saved_path = list(sys.path)  # Flower puts its app dir (the cwd) on sys.path; undo that
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=num_sites,
            backend_config=backend_config,
        )
    finally:
        stopped.set()  # a ServerApp thread still waiting (the runtime died) ends now
        sys.path[:] = saved_path
        if ray.is_initialized():
            ray.shutdown()
        if remove_ray_dir:
            shutil.rmtree(ray_dir, ignore_errors=True)
    if "value" not in result:
        raise RuntimeError("federated simulation ended without a result (see the log above)")
    return result["value"]


def train_federated(
    config: SynthctConfig,
    manifest: str | Path,
    run: str | Path,
    *,
    resume: bool = False,
    max_rounds: int | None = None,
    budget_min: float | None = None,
    keep_payloads: bool = False,
    initial: str | Path | None = None,
    progress: Callable[..., None] | None = None,
) -> Generator:
    """Federated generator training over the config's sites in Flower's simulation."""
    from synthct.fed.app import client as client_app
    from synthct.fed.server_app import FederatedJob, check_resumable, run_federated

    run_dir = Path(run).resolve()
    if resume:
        check_resumable(run_dir, config)  # before the simulation starts
    run_dir.mkdir(parents=True, exist_ok=True)
    job = FederatedJob(
        config=config,
        run_dir=run_dir,
        resume=resume,
        max_rounds=max_rounds,
        budget_min=budget_min,
        sim_manifest=str(Path(manifest).resolve()),
        sim_threads=config.federated.client_cpus,
        keep_payloads=keep_payloads,
        initial=Path(initial) if initial is not None else None,
        progress=progress,
    )
    return simulate(
        lambda grid: run_federated(grid, job),
        client_app,
        num_sites=len(config.site_names),
        run_dir=run_dir,
        client_cpus=config.federated.client_cpus,
        client_gpus=config.federated.num_gpus,
    )
