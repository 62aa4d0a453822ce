"""Flower ServerApp: rounds of federated generator training, checkpointed and resumable.

Phase 1 trains the autoencoder (FedAvg or FedProx over the sites' weights); then every site
reports latent moments under the frozen autoencoder and the server pools them into one scale
factor; phase 2 trains the diffusion UNet on latents (optionally under Flower's central DP
wrapper), keeping the EMA of the aggregated weights here on the server.

Each round (``rounds.py``) uses Flower's strategy (node sampling, messages, aggregation, DP
clipping and noise) or SecAgg+, and Flower's grid; this module adds what a long multi-site run
needs around them: a wait for nodes with a timeout, a checkpoint per round, resume from the
last completed round (true round numbers, so DP accounting and logs continue), ``rounds.jsonl``
with per-site losses, case counts, failures and bytes, and a stop after N rounds or a budget.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from synthct.adoption import adopt_generator
from synthct.artifacts import append_jsonl, read_json, sha256_bytes, write_json
from synthct.checkpoint import (
    CheckpointError,
    Generator,
    build_generator,
    load_generator,
    save_generator,
)
from synthct.config import SynthctConfig
from synthct.fed.errors import FederatedError
from synthct.fed.payload import tensors_to_bytes
from synthct.fed.rounds import (
    RoundRequest,
    make_strategy,
    plain_round,
    privacy_record,
    secure_aggregated_round,
    state_of,
)
from synthct.fed.site_queries import latent_norm_from, query_sites, scanner_noise_from
from synthct.fed.sites import task_config, wait_for_sites
from synthct.models.conditioning import is_per_site_table
from synthct.models.latent_norm import LatentNorm
from synthct.models.scanner_noise import ScannerNoise
from synthct.phases import Next, PhasePosition, run_phases
from synthct.sampling import measures_scanner_noise
from synthct.training import EMA, LatentDecoder

__all__ = ["app", "FederatedJob", "FederatedError", "run_federated"]

logger = logging.getLogger(__name__)

app = ServerApp()

Progress = Callable[..., None]


@dataclass
class FederatedJob:
    """Everything the server needs to drive one run."""

    config: SynthctConfig
    run_dir: Path
    resume: bool = False
    max_rounds: int | None = None  # stop (resumably) after this many rounds in this call
    budget_min: float | None = None  # stop (resumably) after the round that crosses it
    sim_manifest: str | None = None  # simulation only: the single-machine manifest
    sim_threads: int | None = None  # simulation only: torch threads per site
    keep_payloads: bool = False  # sites also keep a copy of every payload they send
    initial: Path | None = None  # fine-tune this generator instead of starting from scratch
    progress: Progress | None = None
    stopped_early: bool = field(default=False, init=False)


class _RunState(PhasePosition):
    """Where the run is: phase, last completed round (``unit``), pooled latent normalisation,
    DP accountant."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.path = run_dir / "fed_state.json"
        self.latent_norm: LatentNorm | None = None
        self.accountant: dict[str, Any] | None = None
        self.privacy_spent: dict[str, Any] | None = None  # the last noised release's account
        # optimiser steps in the server EMA (its warm-up); None: a fine-tuned, trained EMA
        self.ema_steps: int | None = 0
        # the diffusion rounds after which site rows were calibrated (None: not calibrated)
        self.calibrated_after: int | None = None

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> None:
        data = read_json(self.path)
        self.phase, self.unit = data["phase"], int(data["round"])
        if data.get("latent_norm") is not None:
            self.latent_norm = LatentNorm.from_json(data["latent_norm"])
        elif data.get("scale_factor") is not None:  # a run from before per-channel norms
            self.latent_norm = LatentNorm(scale=(float(data["scale_factor"]),))
        self.accountant = data.get("accountant")
        self.privacy_spent = data.get("privacy_spent")
        self.ema_steps = data.get("ema_steps")  # absent: a run from before the warm-up
        self.calibrated_after = data.get("calibrated_after")

    def save(self) -> None:
        write_json(
            self.path,
            {
                "phase": self.phase,
                "round": self.unit,
                "latent_norm": None if self.latent_norm is None else self.latent_norm.to_json(),
                "accountant": self.accountant,
                "privacy_spent": self.privacy_spent,
                "ema_steps": self.ema_steps,
                "calibrated_after": self.calibrated_after,
            },
            kind="federated-state",
        )


def check_resumable(run_dir: Path, config: SynthctConfig) -> None:
    """Refuse to resume a run whose site rows were calibrated after another number of diffusion
    rounds than ``config`` asks for: its UNet is the calibrated EMA, so more diffusion rounds
    would continue from it and the earlier calibration rounds would count as diffusion."""
    path = run_dir / "fed_state.json"
    calibrated = read_json(path).get("calibrated_after") if path.is_file() else None
    if calibrated is not None and calibrated != config.federated.diffusion_rounds:
        raise FederatedError(
            f"{run_dir}: its site rows were calibrated after diffusion round {calibrated} and "
            f"the config asks for {config.federated.diffusion_rounds} diffusion rounds; start a "
            "new run from its generator instead"
        )


def _truncate_rounds_log(path: Path, state: _RunState) -> None:
    """On resume, drop log lines of rounds that were not committed (crash mid-round)."""
    if not path.is_file():
        return
    import json

    phases = ("autoencoder", "decoder", "scale", "noise", "diffusion", "done")
    order = {name: i for i, name in enumerate(phases)}
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        before = order[rec["phase"]] < order[state.phase]
        if before or (rec["phase"] == state.phase and rec["round"] <= state.unit):
            kept.append(line)
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


class _Driver:
    """Runs one job on one grid: the federated driver of :func:`synthct.phases.run_phases`
    (one round per unit; the state file is the commit point)."""

    def __init__(self, grid: Grid, job: FederatedJob) -> None:
        self.grid, self.job, self.config = grid, job, job.config
        self.run_dir = job.run_dir
        self.state = _RunState(self.run_dir)
        self.position: PhasePosition = self.state  # what run_phases moves on
        self.rounds_log = self.run_dir / "rounds.jsonl"
        self.executed = 0
        self.started = time.monotonic()
        self.gen: Generator | None = None
        self.model: torch.nn.Module | None = None  # the phase's, set by start()
        self.strategy: Strategy | None = None
        self.accountant: Any = None
        self.ema: EMA | None = None

    # -- shared message settings --------------------------------------------------------
    def _base_config(self, phase: str) -> ConfigRecord:
        manifest = None if self.job.sim_manifest is None else Path(self.job.sim_manifest)
        cfg = ConfigRecord(
            {
                **task_config(
                    self.config, "generator", manifest=manifest, site_root=self.run_dir / "sites"
                ),
                "phase": phase,
            }
        )
        if self.job.sim_threads is not None:
            cfg["sim-threads"] = self.job.sim_threads
        if self.job.keep_payloads:
            cfg["keep-payload"] = True
        return cfg

    def _with_frozen_autoencoder(self, cfg: ConfigRecord, gen: Generator) -> ConfigRecord:
        data = tensors_to_bytes(state_of(gen.autoencoder))
        cfg["autoencoder-safetensors"] = data
        cfg["autoencoder-sha256"] = sha256_bytes(data)
        return cfg

    # -- the run ------------------------------------------------------------------------
    def run(self) -> Generator:
        config, state = self.config, self.state
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.job.resume and state.exists:
            state.load()
            gen = load_generator(self.run_dir / "generator")
            _truncate_rounds_log(self.rounds_log, state)
            check_resumable(self.run_dir, config)
            logger.info("resuming federated run at %s round %d", state.phase, state.unit)
        else:
            if state.exists:
                raise FederatedError(
                    f"{self.run_dir} already holds a federated run; pass resume or a new directory"
                )
            if self.job.initial is not None:
                try:  # the run's schedule, same networks (site awareness may be added)
                    gen = adopt_generator(
                        load_generator(self.job.initial),
                        config,
                        what=str(self.job.initial),
                        restart_unet=config.federated.restart_unet,
                    )
                except CheckpointError as exc:
                    raise FederatedError(str(exc)) from None
                gen.scanner_noise = None  # measured on other sites' data, or another decoder
                state.ema_steps = None  # continue its trained EMA: no warm-up
                if config.federated.restart_unet:  # its autoencoder only: a UNet from scratch
                    state.ema_steps = 0
                    logger.info("%s: autoencoder kept, UNet from scratch", self.job.initial)
                if gen.latent_norm.mode != config.diffusion.latent_norm:
                    # adopted with a fresh UNet (its own learnt another latent space): the EMA
                    # warms up from zero and the latents are normalised anew
                    state.ema_steps = 0
                    logger.info(
                        "%s: %s latent normalisation, the config asks for %s: fresh UNet",
                        self.job.initial,
                        gen.latent_norm.mode,
                        config.diffusion.latent_norm,
                    )
                elif config.federated.ae_rounds == 0:  # frozen autoencoder: keep its latents
                    state.latent_norm = gen.latent_norm
            else:
                if config.federated.restart_unet:
                    logger.info("federated.restart_unet without an initial generator: ignored")
                gen = build_generator(config, seed=config.seed)
        self.gen = gen
        run_phases(self)
        return gen

    # -- the phase driver (synthct.phases.run_phases): one federated round per unit -------
    def total(self, phase: str) -> int:
        fed = self.config.federated
        return {
            "autoencoder": fed.ae_rounds,
            "decoder": fed.decoder_rounds,
            "diffusion": fed.diffusion_rounds + self._calibration_rounds(),
        }[phase]

    def _calibration_rounds(self) -> int:
        """Site-row calibration rounds after the diffusion rounds (site-conditioned UNets)."""
        fed = self.config.federated
        if self.gen is None or not self.gen.conditioning.site_conditioned:
            return 0
        return 0 if fed.dp_phase("diffusion") else fed.site_calibration_rounds  # DP mixes rows

    def _calibrating(self, phase: str, index: int) -> bool:
        return phase == "diffusion" and index > self.config.federated.diffusion_rounds

    def start(self, phase: str) -> None:
        """The phase's model, strategy (and its DP accountant) and the server EMA; before
        diffusion, once per autoencoder, the sites' pooled latent normalisation and their
        scanner noise spectra."""
        config, state, gen = self.config, self.state, self.gen
        if phase == "diffusion":
            if state.latent_norm is None:
                gen.latent_norm = state.latent_norm = self._pool_latent_norm(gen)
                self._commit(gen)
            gen.latent_norm = state.latent_norm
            if gen.scanner_noise is None and measures_scanner_noise(gen, config):
                gen.scanner_noise = self._collect_scanner_noise(gen)
                self._commit(gen)
        self.model = {
            "autoencoder": gen.autoencoder,
            # shares the autoencoder's (and the discriminator's) modules
            "decoder": LatentDecoder(gen.autoencoder, gen.discriminator),
            "diffusion": gen.unet,
        }[phase]
        self.strategy = make_strategy(config, phase, len(config.site_names))
        self.accountant = getattr(self.strategy, "accountant", None)
        if self.accountant is not None and state.accountant:
            self.accountant.load_state_dict(state.accountant)
        self.ema = None
        if phase == "diffusion":
            self.ema = EMA(
                gen.unet, config.diffusion.ema_decay, target=gen.ema, step=state.ema_steps
            )

    def unit(self, phase: str, index: int) -> tuple[dict[str, Any] | None, Next]:
        """One round; a round cap or budget stops the run before it (resumably)."""
        config, state = self.config, self.state
        if self._should_stop():
            self.job.stopped_early = True
            logger.info("stopping after %d round(s); resume to continue", self.executed)
            return None, Next.STOP
        if self._calibrating(phase, index):
            return self._calibration_round(index), Next.CONTINUE
        record = self._one_round(self.gen, self.model, self.strategy, phase, index)
        if record["aggregated"] and self.ema is not None:
            # one round = local_steps optimiser steps
            self.ema.update(self.gen.unet, config.federated.local_steps_diffusion)
            state.ema_steps = self.ema.step
        if config.federated.dp_phase(phase) and self.accountant is not None:
            state.accountant = self.accountant.state_dict()
            spent = self.accountant.get_privacy_spent()
            record["dp"] = {
                "epsilon": spent.epsilon,  # the whole run so far, every phase
                "delta": spent.delta,
                "releases": spent.num_releases,
                "noise_multiplier": config.federated.privacy.noise_multiplier,
                "clipping_norm": config.federated.privacy.clipping_norm,
            }
            state.privacy_spent = record["dp"]
        return record, Next.CONTINUE

    def commit(self, phase: str, record: dict[str, Any]) -> None:
        self._commit(self.gen, record)
        self.executed += 1
        if self.job.progress:
            self.job.progress(phase, self.state.unit, self.total(phase), loss=record.get("loss"))

    def end(self, phase: str) -> None:
        if phase == "autoencoder" and self.config.federated.ae_rounds > 0:
            self.state.latent_norm = None  # the autoencoder changed: pool a new normalisation
        if self.total(phase) > 0 and phase in ("autoencoder", "decoder"):
            self.gen.scanner_noise = None  # measured against another decoder: measure anew
        self._commit(self.gen)

    def _calibration_round(self, index: int) -> dict[str, Any]:
        """One round in which each site trains only its own rows of the UNet's per-site tables
        (site embedding, and per-site norms if it has them) against the EMA UNet (which
        samples): the UNet starts as the EMA, the sites' own rows come back, and the EMA takes
        them as they are (no averaging: every other weight is frozen)."""
        gen, fed = self.gen, self.config.federated
        ema = gen.ema.state_dict()  # untouched by the round: the sites train gen.unet
        tables = [k for k in ema if is_per_site_table(k)]
        self.state.calibrated_after = fed.diffusion_rounds
        gen.unet.load_state_dict(ema)
        before = {t: ema[t].clone() for t in tables}
        record = self._one_round(
            gen,
            gen.unet,
            self.strategy,
            "diffusion",
            index,
            extra={"train-only": ",".join(tables), "lr": fed.site_calibration_lr},
        )
        rows = {t: v.clone() for t, v in before.items()}
        if record["aggregated"]:
            sent = gen.unet.state_dict()
            for s in record["sites"]:  # the rows their owners trained; all else as before
                i = self.config.site_names.index(s["site"])
                for t in tables:
                    rows[t][i] = sent[t][i]
        gen.unet.load_state_dict(ema)  # undo FedAvg's rounding of frozen weights
        with torch.no_grad():
            for t in tables:
                gen.unet.get_parameter(t).copy_(rows[t])
                gen.ema.get_parameter(t).copy_(rows[t])
        moved = {
            s: round(
                float(torch.sqrt(sum(((rows[t][i] - before[t][i]) ** 2).sum() for t in tables))), 4
            )
            for i, s in enumerate(self.config.site_names)
        }
        record["calibration"] = {"rows_moved": moved, "tables": len(tables)}
        return record

    def _one_round(
        self,
        gen: Generator,
        model: torch.nn.Module,
        strategy: Strategy,
        phase: str,
        server_round: int,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The round's message settings (local steps, frozen encoder, latent normalisation),
        then one plain or secure aggregation round (``rounds.py``)."""
        config, fed = self.config, self.config.federated
        t0 = time.perf_counter()
        nodes = wait_for_sites(self.grid, config)
        cfg = self._base_config(phase)
        cfg["local-steps"] = {
            "autoencoder": fed.local_steps_ae,
            "decoder": fed.local_steps_decoder,
            "diffusion": fed.local_steps_diffusion,
        }[phase]
        if phase in ("decoder", "diffusion"):  # sites encode their cases with this encoder
            cfg = self._with_frozen_autoencoder(cfg, gen)
        if phase == "diffusion":
            cfg["latent-norm"] = json.dumps(gen.latent_norm.to_json())
        for key, value in (extra or {}).items():
            cfg[key] = value
        request = RoundRequest(
            self.grid, config, model, strategy, phase, server_round, cfg, nodes, t0
        )
        return secure_aggregated_round(request) if fed.secagg.enabled else plain_round(request)

    def _commit(self, gen: Generator, record: dict[str, Any] | None = None) -> None:
        """Checkpoint, round log line, then state: the state file is the commit point (on
        resume, log lines past it are dropped)."""
        extra: dict[str, Any] = {
            "trained": {"federated": True, "phase": self.state.phase, "round": self.state.unit}
        }
        if self.config.federated.privacy.enabled:
            initial = None if self.job.initial is None else str(self.job.initial)
            extra["privacy"] = privacy_record(
                self.config, self.state.privacy_spent, initial=initial
            )
        save_generator(gen, self.run_dir / "generator", extra=extra)
        if record is not None:
            append_jsonl(self.rounds_log, record)
        self.state.save()

    def _should_stop(self) -> bool:
        job = self.job
        if job.max_rounds is not None and self.executed >= job.max_rounds:
            return True
        return bool(job.budget_min and time.monotonic() - self.started > job.budget_min * 60)

    def _query(self, gen: Generator, phase: str) -> list[Message]:
        return query_sites(
            self.grid, self.config, self._with_frozen_autoencoder(self._base_config(phase), gen)
        )

    def _pool_latent_norm(self, gen: Generator) -> LatentNorm:
        """The UNet's latent normalisation (the config's kind) over all sites' latents, pooled
        exactly from each site's per-channel count, sum and sum of squares."""
        norm, record = latent_norm_from(self.config, self._query(gen, "scale"))
        append_jsonl(self.rounds_log, record)
        logger.info("pooled %s latent normalisation from %d sites", norm.mode, len(record["cases"]))
        return norm

    def _collect_scanner_noise(self, gen: Generator) -> ScannerNoise | None:
        """Each site's scanner noise spectrum; cases for a site whose reply was set aside get
        the other sites' pooled noise."""
        noise, record = scanner_noise_from(self.config, self._query(gen, "noise"))
        append_jsonl(self.rounds_log, record)
        return noise


def run_federated(grid: Grid, job: FederatedJob) -> Generator:
    """Drive a whole federated run on ``grid`` (simulation or deployment)."""
    return _Driver(grid, job).run()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry of app directories written before ``fed/app.py``: the one app's
    server with its run config (task ``generator`` unless it names another)."""
    from synthct.fed.app import main as run_task

    run_task(grid, context)
