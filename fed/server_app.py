"""Flower ServerApp: rounds of federated generator training, checkpointed and resumable.

Phase 1 trains the autoencoder (FedAvg or FedProx over the sites' weights); then every site
reports latent moments under the frozen autoencoder and the server pools them into one scale
factor; phase 2 trains the diffusion UNet on latents (optionally under Flower's central DP
wrapper), keeping the EMA of the aggregated weights here on the server.

Each round uses Flower's strategy (node sampling, messages, aggregation, DP clipping and noise)
and Flower's grid; this module adds what a long multi-site run needs around it: a wait for
nodes with a timeout, a minimum number of replies, a checkpoint per round, resume from the
last completed round (true round numbers, so DP accounting and logs continue), ``rounds.jsonl``
with per-site losses, case counts, failures and bytes, and a stop after N rounds or a budget.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)
from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

from synthct.artifacts import append_jsonl, read_json, sha256_bytes, write_json
from synthct.checkpoint import (
    CheckpointError,
    Generator,
    adopt_generator,
    build_generator,
    load_generator,
    save_generator,
)
from synthct.config import SynthctConfig
from synthct.fed.dp import add_dp_noise, make_accountant
from synthct.fed.errors import FederatedError
from synthct.fed.secagg import (
    SecAggSettings,
    SecureRound,
    apply_mean_update,
    secure_round,
    settings_from_config,
    site_weight_factor,
)
from synthct.fed.sites import screen_updates, task_config, wait_for_sites
from synthct.fed.task import (
    PHASES,
    payload_digest,
    tensors_to_bytes,
)
from synthct.models.latent_norm import LatentNorm, pooled_latent_norm
from synthct.phases import Next, PhasePosition, run_phases
from synthct.training import EMA, LatentDecoder

__all__ = ["app", "FederatedJob", "FederatedError", "run_federated", "make_strategy"]

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


def make_strategy(config: SynthctConfig, phase: str, num_sites: int) -> Strategy:
    """Flower strategy for a phase: FedAvg/FedProx weighted by cases, or uniform under DP."""
    fed = config.federated
    dp = fed.dp_phase(phase)
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": fed.min_sites,
        "min_available_nodes": fed.min_sites,
        # DP accounting requires equal client weights (Flower checks it).
        "weighted_by_key": "unit-weight" if dp else "num-examples",
    }
    if fed.strategy == "fedprox":
        strategy: Strategy = FedProx(proximal_mu=fed.proximal_mu, **common)
    else:
        strategy = FedAvg(**common)
    if not dp:
        return strategy
    # the config refuses DP with FedProx: Flower's accountant covers plain FedAvg only
    accountant = make_accountant(config, num_sites)
    return DifferentialPrivacyServerSideFixedClipping(
        strategy,
        noise_multiplier=fed.privacy.noise_multiplier,
        clipping_norm=fed.privacy.clipping_norm,
        num_sampled_clients=num_sites,
        accountant=accountant,
    )


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
            },
            kind="federated-state",
        )


def _site_index(reply: Message) -> int:
    """The replying site's index in the run's site list (sent with its metrics)."""
    return int(next(iter(reply.content.metric_records.values()))["site-index"])


def _site_name(config: SynthctConfig, reply: Message) -> str:
    return config.site_names[_site_index(reply)]


def _state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _arrays_nbytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())


def _truncate_rounds_log(path: Path, state: _RunState) -> None:
    """On resume, drop log lines of rounds that were not committed (crash mid-round)."""
    if not path.is_file():
        return
    import json

    phases = ("autoencoder", "decoder", "scale", "diffusion", "done")
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
        data = tensors_to_bytes(_state_of(gen.autoencoder))
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
            "diffusion": fed.diffusion_rounds,
        }[phase]

    def start(self, phase: str) -> None:
        """The phase's model, strategy (and its DP accountant) and the server EMA; before
        diffusion, the sites' pooled latent normalisation once per autoencoder."""
        config, state, gen = self.config, self.state, self.gen
        if phase == "diffusion":
            if state.latent_norm is None:
                gen.latent_norm = state.latent_norm = self._pool_latent_norm(gen)
                self._commit(gen)
            gen.latent_norm = state.latent_norm
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
        self._commit(self.gen)

    def _commit(self, gen: Generator, record: dict[str, Any] | None = None) -> None:
        """Checkpoint, round log line, then state: the state file is the commit point (on
        resume, log lines past it are dropped)."""
        extra: dict[str, Any] = {
            "trained": {"federated": True, "phase": self.state.phase, "round": self.state.unit}
        }
        if self.config.federated.privacy.enabled:
            extra["privacy"] = privacy_record(self.config, self.state.privacy_spent)
        save_generator(gen, self.run_dir / "generator", extra=extra)
        if record is not None:
            append_jsonl(self.rounds_log, record)
        self.state.save()

    def _should_stop(self) -> bool:
        job = self.job
        if job.max_rounds is not None and self.executed >= job.max_rounds:
            return True
        return bool(job.budget_min and time.monotonic() - self.started > job.budget_min * 60)

    def _one_round(
        self,
        gen: Generator,
        model: torch.nn.Module,
        strategy: Strategy,
        phase: str,
        server_round: int,
    ) -> dict[str, Any]:
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
        if fed.secagg.enabled:
            return self._one_secure_round(model, strategy, phase, server_round, cfg, nodes, t0)
        arrays = ArrayRecord(_state_of(model))
        messages = list(strategy.configure_train(server_round, arrays, cfg, self.grid))
        down_bytes = sum(
            _arrays_nbytes(m.content["arrays"])
            + sum(len(v) for v in m.content["config"].values() if isinstance(v, bytes))
            for m in messages
        )
        replies = list(self.grid.send_and_receive(messages, timeout=fed.round_timeout_s))
        ok = [r for r in replies if not r.has_error()]
        ok.sort(key=lambda r: _site_name(config, r))  # aggregation order fixed -> reproducible
        failures = [
            {"node": r.metadata.src_node_id, "reason": r.error.reason}
            for r in replies
            if r.has_error()
        ]
        ok, rejected = screen_updates(
            ok, arrays.to_torch_state_dict(), fed.reject_norm_ratio, lambda r: _site_name(config, r)
        )
        failures += rejected
        timed_out = len(messages) - len(replies)
        for f in failures:
            logger.warning("%s round %d: a site failed: %s", phase, server_round, f["reason"])
        if timed_out:
            logger.warning(
                "%s round %d: %d site(s) did not reply within %.0f s",
                phase,
                server_round,
                timed_out,
                fed.round_timeout_s,
            )
        aggregated = None
        if len(ok) >= fed.min_sites:
            aggregated, _ = strategy.aggregate_train(server_round, [*ok, *_errors(replies)])
        else:
            logger.warning(
                "%s round %d: %d replies < federated.min_sites = %d; round skipped",
                phase,
                server_round,
                len(ok),
                fed.min_sites,
            )
            strategy.aggregate_train(server_round, _errors(replies))  # releases DP bookkeeping
        if aggregated is not None:
            state = aggregated.to_torch_state_dict()
            if not fed.dp_phase(phase):  # DP noises every row
                owned = [(_site_index(r), r.content["arrays"].to_torch_state_dict()) for r in ok]
                take_owned_rows(state, owned)
            model.load_state_dict(state, strict=True)
        sites = []
        for r in ok:
            metrics = next(iter(r.content.metric_records.values()))
            up_bytes, up_sha = payload_digest(r.content["arrays"].to_torch_state_dict())
            loss = float(metrics["loss"])
            sites.append(
                {
                    "site": _site_name(config, r),
                    "loss": loss if math.isfinite(loss) else None,  # None: no local steps
                    "cases": int(metrics["num-examples"]),
                    "steps": int(metrics["steps"]),
                    "bytes_up": up_bytes,
                    "sha256_up": up_sha,
                    "audit_chain": _audit_chain(r),
                }
            )
        return _round_record(
            phase,
            server_round,
            t0,
            sites,
            replies=len(ok),
            sent=len(messages),
            failures=failures,
            timed_out=timed_out,
            aggregated=aggregated is not None,
            bytes_down=down_bytes,
        )

    def _one_secure_round(
        self,
        model: torch.nn.Module,
        strategy: Strategy,
        phase: str,
        server_round: int,
        cfg: ConfigRecord,
        nodes: list[int],
        t0: float,
    ) -> dict[str, Any]:
        """One round under SecAgg+ on ``nodes``: the server gets only the weighted mean of the
        sites' clipped updates (``fed/secagg.py``); under DP it adds the noise to that mean."""
        config, fed = self.config, self.config.federated
        if fed.strategy == "fedprox":
            cfg["proximal-mu"] = fed.proximal_mu
        dp = fed.dp_phase(phase)
        settings = settings_from_config(fed, phase, dp=dp)
        global_state = _state_of(model)
        result = secure_round(self.grid, nodes, global_state, cfg, server_round, settings)
        for reason in result.failures:
            logger.warning("%s round %d (secure): %s", phase, server_round, reason)
        if result.aggregated:
            mean = result.mean_update
            if dp:
                add_dp_noise(mean, fed.privacy.noise_multiplier, settings.clip_norm, len(nodes))
                accountant = getattr(strategy, "accountant", None)
                if accountant is not None and len(result.sites) == len(nodes):
                    accountant.compose(
                        GaussianPrivacyEvent(
                            noise_multiplier=fed.privacy.noise_multiplier,
                            sample_size=len(nodes),
                            population_size=len(config.site_names),
                        )
                    )
            else:
                owned_rows_from_secure_mean(mean, result, settings)
            model.load_state_dict(apply_mean_update(global_state, mean), strict=True)
        sites = []
        for s in sorted(result.sites, key=lambda s: config.site_names[int(s["site-index"])]):
            loss = float(s["loss"])
            sites.append(
                {
                    "site": config.site_names[int(s["site-index"])],
                    "loss": loss if math.isfinite(loss) else None,
                    "cases": int(s["num-examples"]),
                    "steps": int(s["steps"]),
                    "bytes_up": result.bytes_up // max(len(result.sites), 1),
                    "sha256_up": str(s["update-sha256"]),  # the site's digest of its update
                    "update_norm": float(s["update-norm"]),  # before clipping
                    "audit_chain": s.get("audit-chain"),
                }
            )
        return _round_record(
            phase,
            server_round,
            t0,
            sites,
            secure_aggregation={"clip_norm": settings.clip_norm, "unit_weight": dp},
            replies=len(result.sites),
            sent=len(nodes),
            failures=[{"reason": r} for r in result.failures],
            timed_out=0,
            aggregated=result.aggregated,
            bytes_down=result.bytes_down,
        )

    def _pool_latent_norm(self, gen: Generator) -> LatentNorm:
        """The UNet's latent normalisation (the config's kind) over all sites' latents, pooled
        exactly from each site's per-channel count, sum and sum of squares."""
        config = self.config
        nodes = wait_for_sites(self.grid, config)
        cfg = self._with_frozen_autoencoder(self._base_config("scale"), gen)
        messages = [
            Message(
                content=RecordDict({"config": cfg}),
                message_type=MessageType.QUERY,
                dst_node_id=node,
            )
            for node in nodes
        ]
        replies = list(
            self.grid.send_and_receive(messages, timeout=config.federated.round_timeout_s)
        )
        ok = [r for r in replies if not r.has_error()]
        if len(ok) < config.federated.min_sites:
            reasons = [r.error.reason for r in replies if r.has_error()]
            raise FederatedError(
                f"latent normalisation: {len(ok)} site(s) replied, need {config.federated.min_sites}; "
                f"errors: {reasons}"
            )
        moments, per_site = [], {}
        for r in ok:
            m = next(iter(r.content.metric_records.values()))
            moments.append({k: [float(v) for v in m[k]] for k in ("count", "sum", "sumsq")})
            per_site[_site_name(config, r)] = int(m["num-examples"])
        try:
            norm = pooled_latent_norm(moments, config.diffusion.latent_norm)
        except ValueError as exc:
            raise FederatedError(str(exc)) from None
        append_jsonl(
            self.rounds_log,
            {"phase": "scale", "round": 0, "latent_norm": norm.to_json(), "cases": per_site},
        )
        logger.info("pooled %s latent normalisation from %d sites", norm.mode, len(ok))
        return norm


# Tables with one row per site (decoder style, UNet site embeddings): only the site that owns
# row i ever moves it; the others send it back unchanged.
PER_SITE_ROWS = (
    "site_style.feature_bias.weight",
    "site_style.output_affine.weight",
    "class_embedding.sites.weight",
)


def take_owned_rows(
    state: dict[str, torch.Tensor], replies: list[tuple[int, dict[str, torch.Tensor]]]
) -> None:
    """Set each per-site row of the averaged ``state`` to what its own site sent (in place).

    FedAvg would average site i's row with the unchanged copies the other sites return,
    shrinking every site's style update by the number of sites (the 2026-12-03 run's rows
    barely moved); rows no site owns (the null site, spare slots) keep the average."""
    for index, theirs in replies:
        for key in PER_SITE_ROWS:
            if key in state and key in theirs and index < len(state[key]):
                state[key][index] = theirs[key][index]


def _round_record(
    phase: str, server_round: int, t0: float, sites: list[dict[str, Any]], **fields: Any
) -> dict[str, Any]:
    """One ``rounds.jsonl`` line: the round's fields, its case-weighted mean loss over the
    sites that trained and the bytes they sent."""
    scored = [s for s in sites if s["loss"] is not None]
    total_cases = sum(s["cases"] for s in scored)
    loss = sum(s["loss"] * s["cases"] for s in scored) / total_cases if total_cases else None
    return {
        "phase": phase,
        "round": server_round,
        "wall_s": round(time.perf_counter() - t0, 3),
        **fields,
        "loss": loss,
        "sites": sites,
        "bytes_up": sum(s["bytes_up"] for s in sites),
    }


def privacy_record(config: SynthctConfig, spent: dict[str, Any] | None) -> dict[str, Any]:
    """The generator's privacy account: one (epsilon, delta) per site for every noised
    release of the run, and what it does not cover."""
    dp = config.federated.privacy
    return {
        "mechanism": "central DP, Gaussian, server-side fixed clipping (Flower), RDP accountant",
        "epsilon": None if spent is None else spent["epsilon"],  # None: nothing released yet
        "delta": dp.target_delta,
        "releases": 0 if spent is None else spent["releases"],
        "noise_multiplier": dp.noise_multiplier,
        "clipping_norm": dp.clipping_norm,
        "phases": list(dp.phases),
        "not_covered": [
            *[f"{p} updates" for p in PHASES if p not in dp.phases],
            "latent moments (per-channel mean and variance of each site's latents, pooled "
            "once for the latent normalisation)",
        ],
    }


def owned_rows_from_secure_mean(
    mean: dict[str, torch.Tensor], result: SecureRound, settings: SecAggSettings
) -> None:
    """``take_owned_rows`` for a secure mean (in place): only site i moves row i, so the
    mean's row i is ``q_i / sum(q)`` times site i's row update (``q``: the protocol's integer
    weight from the plain-text case count); scaling it back gives that site's own row update.
    (Weight decay on the other sites moves the row slightly too; that share stays in.)"""
    weights = {
        int(s["site-index"]): site_weight_factor(int(s["num-examples"]), settings)
        for s in result.sites
    }
    total = sum(weights.values())
    for key in PER_SITE_ROWS:
        if key not in mean:
            continue
        for index, q in weights.items():
            if index < len(mean[key]) and q > 0:
                mean[key][index] *= total / q


def _audit_chain(reply: Message) -> str | None:
    """The head of the site's audit chain it reported with this reply (None: not reported)."""
    record = reply.content.config_records.get("audit")
    return None if record is None else str(record["chain"])


def _errors(replies: list[Message]) -> list[Message]:
    return [r for r in replies if r.has_error()]


def run_federated(grid: Grid, job: FederatedJob) -> Generator:
    """Drive a whole federated run on ``grid`` (simulation or deployment)."""
    return _Driver(grid, job).run()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry of app directories written before ``fed/app.py``: the one app's
    server with its run config (task ``generator`` unless it names another)."""
    from synthct.fed.app import main as run_task

    run_task(grid, context)
