"""One aggregation round of the generator's training, plain (Flower strategy) or secure (SecAgg+).

The server driver (``server_app.py``) decides which phase and round to run and commits the
result; this module sends the round's messages, screens and aggregates the replies, keeps each
per-site row with its own site, and returns the round's ``rounds.jsonl`` record.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)

from synthct.config import SynthctConfig
from synthct.fed.dp import make_accountant, noise_and_account
from synthct.fed.payload import payload_digest
from synthct.fed.secagg import (
    SecAggSettings,
    SecureRound,
    apply_mean_update,
    secure_round,
    settings_from_config,
    site_weight_factor,
)
from synthct.fed.sites import screen_updates
from synthct.fed.task import PHASES
from synthct.models.conditioning import PER_SITE_ROWS, UNET_SITE_ROWS, is_per_site_table

__all__ = [
    "PER_SITE_ROWS",
    "UNET_SITE_ROWS",
    "is_per_site_table",
    "RoundRequest",
    "make_strategy",
    "plain_round",
    "secure_aggregated_round",
    "take_owned_rows",
    "owned_rows_from_secure_mean",
    "privacy_record",
    "site_name",
    "state_of",
]

logger = logging.getLogger(__name__)


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


def _site_index(reply: Message) -> int:
    """The replying site's index in the run's site list (sent with its metrics)."""
    return int(next(iter(reply.content.metric_records.values()))["site-index"])


def site_name(config: SynthctConfig, reply: Message) -> str:
    return config.site_names[_site_index(reply)]


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _arrays_nbytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())


@dataclass(frozen=True)
class RoundRequest:
    """One round to run: on ``grid`` with the connected ``nodes``, the phase's ``model`` (updated
    in place) and ``strategy``, the message settings ``cfg``; ``t0``: when the round began."""

    grid: Grid
    config: SynthctConfig
    model: torch.nn.Module
    strategy: Strategy
    phase: str
    server_round: int
    cfg: ConfigRecord
    nodes: list[int]
    t0: float


def plain_round(request: RoundRequest) -> dict[str, Any]:
    """One round through Flower's ``strategy``: send ``model`` with ``cfg``, screen the
    replies, aggregate (when at least ``min_sites`` replied) into ``model`` in place."""
    grid, config, model, strategy = request.grid, request.config, request.model, request.strategy
    phase, server_round, cfg, t0 = request.phase, request.server_round, request.cfg, request.t0
    fed = config.federated
    arrays = ArrayRecord(state_of(model))
    messages = list(strategy.configure_train(server_round, arrays, cfg, grid))
    down_bytes = sum(
        _arrays_nbytes(m.content["arrays"])
        + sum(len(v) for v in m.content["config"].values() if isinstance(v, bytes))
        for m in messages
    )
    replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout_s))
    ok = [r for r in replies if not r.has_error()]
    ok.sort(key=lambda r: site_name(config, r))  # aggregation order fixed -> reproducible
    failures = [
        {"node": r.metadata.src_node_id, "reason": r.error.reason} for r in replies if r.has_error()
    ]
    ok, rejected = screen_updates(
        ok, arrays.to_torch_state_dict(), fed.reject_norm_ratio, lambda r: site_name(config, r)
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
                "site": site_name(config, r),
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


def secure_aggregated_round(request: RoundRequest) -> dict[str, Any]:
    """One round under SecAgg+ on ``nodes``: the server gets only the weighted mean of the
    sites' clipped updates (``fed/secagg.py``); under DP it adds the noise to that mean."""
    grid, config, model, nodes = request.grid, request.config, request.model, request.nodes
    phase, server_round, cfg, t0 = request.phase, request.server_round, request.cfg, request.t0
    strategy = request.strategy
    fed = config.federated
    if fed.strategy == "fedprox":
        cfg["proximal-mu"] = fed.proximal_mu
    dp = fed.dp_phase(phase)
    settings = settings_from_config(fed, phase, dp=dp)
    global_state = state_of(model)
    result = secure_round(grid, nodes, global_state, cfg, server_round, settings)
    for reason in result.failures:
        logger.warning("%s round %d (secure): %s", phase, server_round, reason)
    if result.aggregated:
        mean = result.mean_update
        if dp:
            # sized by the updates the mean holds (a dropout leaves fewer), always accounted
            noise_and_account(
                mean,
                strategy.accountant,  # DP phases run under Flower's DP wrapper, which has one
                fed.privacy.noise_multiplier,
                settings.clip_norm,
                len(result.sites),
                len(config.site_names),
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


def take_owned_rows(
    state: dict[str, torch.Tensor], replies: list[tuple[int, dict[str, torch.Tensor]]]
) -> None:
    """Set each per-site row of the averaged ``state`` to what its own site sent (in place).

    FedAvg would average site i's row with the unchanged copies the other sites return,
    shrinking every site's style update by the number of sites (the 2026-12-03 run's rows
    barely moved); rows no site owns (the null site, spare slots) keep the average."""
    tables = [k for k in state if is_per_site_table(k)]
    for index, theirs in replies:
        for key in tables:
            if key in theirs and index < len(state[key]):
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


def privacy_record(
    config: SynthctConfig, spent: dict[str, Any] | None, *, initial: str | None = None
) -> dict[str, Any]:
    """The generator's privacy account: one (epsilon, delta) per site for every noised
    release of the run, and what it does not cover (phases trained without noise, and the
    ``initial`` generator the run continued, whose training no account covers)."""
    dp = config.federated.privacy
    unnoised = [f"{p} updates" for p in PHASES if p not in dp.phases]
    earlier = [f"the generator it continued ({initial}), trained outside this account"]
    return {
        "mechanism": "central DP, Gaussian, fixed clipping (Flower), RDP accountant",
        "epsilon": None if spent is None else spent["epsilon"],  # None: nothing released yet
        "delta": dp.target_delta,
        "releases": 0 if spent is None else spent["releases"],
        "noise_multiplier": dp.noise_multiplier,
        "clipping_norm": dp.clipping_norm,
        "phases": list(dp.phases),
        # whether the epsilon bounds every model update the sites' data shaped
        "bounds_every_update": not unnoised and initial is None,
        "not_covered": [
            *unnoised,
            *(earlier if initial is not None else []),
            "latent moments (per-channel mean and variance of each site's latents, pooled "
            "once for the latent normalisation)",
            "each site's per-round training loss and case count (under SecAgg+ also its "
            "update norm before clipping)",
        ],
    }


def owned_rows_from_secure_mean(
    mean: dict[str, torch.Tensor], result: SecureRound, settings: SecAggSettings
) -> None:
    """``take_owned_rows`` for a secure mean (in place): only site i moves row i, so the
    mean's row i is ``q_i / sum(q)`` times site i's row update (``q``: the protocol's integer
    weight from the plain-text case count); scaling it back gives that site's own row update.
    (Per-site rows get no weight decay, so no other site moves row i.)"""
    weights = {
        int(s["site-index"]): site_weight_factor(int(s["num-examples"]), settings)
        for s in result.sites
    }
    total = sum(weights.values())
    for key in [k for k in mean if is_per_site_table(k)]:
        for index, q in weights.items():
            if index < len(mean[key]) and q > 0:
                mean[key][index] *= total / q


def _audit_chain(reply: Message) -> str | None:
    """The head of the site's audit chain it reported with this reply (None: not reported)."""
    record = reply.content.config_records.get("audit")
    return None if record is None else str(record["chain"])


def _errors(replies: list[Message]) -> list[Message]:
    return [r for r in replies if r.has_error()]
