"""Federated downstream classifier on Flower: FedAvg over the sites, then per-site evaluation.

Each site trains on its own real ``train`` cases plus the cohort cases meant for it (``site`` =
itself or ``pooled``). In Flower's simulation the cohort is the server's folder; a deployed site
reads its own copy (node config ``cohort``: the copy's manifest) and trains on it only when its
files hash to the digest of the cohort the gate judged, which the server sends. After every
round it scores the global model on its own ``holdout`` split and sends per-class counts only;
the server stops when the pooled holdout score stalls (``downstream.patience_rounds``) and
keeps the best round. Each site then evaluates that model on its own ``test`` split; only
weights, holdout counts and the test-set class probabilities (with their labels) leave a site.
The training loop is Flower's own ``FedAvg.start`` (weighted by cases); the final evaluation
round is sent explicitly so every site's results are collected, not just their average.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from synthct.artifacts import sha256_bytes
from synthct.classifier import (
    ArmResult,
    build_classifier,
    class_counts,
    join,
    load_cohort_for,
    predict,
    train_epochs,
)
from synthct.config import SynthctConfig
from synthct.data.dataset import CaseSet
from synthct.data.manifest import read_manifest
from synthct.fed.dp import ClassifierDP
from synthct.fed.errors import SiteError
from synthct.fed.fedavg_run import fedavg_then_evaluate, holdout_count_metrics
from synthct.fed.secagg import secure_train_mod
from synthct.fed.site_state import OptimizerStateStore, ProcessCache, load_site_cases, round_seed
from synthct.fed.sites import SiteSettings, prepare_site, release, task_config, wait_for_sites

__all__ = [
    "app",
    "cohort_digest",
    "downstream_dp",
    "downstream_server",
    "train_downstream_federated",
    "DOWNSTREAM_NOT_COVERED",
]

logger = logging.getLogger(__name__)

app = ClientApp()


def cohort_digest(manifest: Path) -> str:
    """One sha256 over a cohort's manifest and every file it lists (what the gate hashed)."""
    from synthct.eval.gate import hash_cohort

    info, _ = hash_cohort(Path(manifest))
    return sha256_bytes(json.dumps(info, sort_keys=True).encode())


_COHORT_CACHE = ProcessCache()  # (cohort manifest, mtime, site, vocabulary) -> its cases


def _cohort_cases(path: Path, config: SynthctConfig, site: str) -> CaseSet | None:
    """The site's share of the cohort, read once per process: every round trains on the same
    cases, so a simulation actor need not re-read them each round."""
    key = (str(path.resolve()), path.stat().st_mtime, site, config.labels.vocabulary_hash)
    return _COHORT_CACHE.get(key, lambda: load_cohort_for(path, config, site))


def _site_cohort(cfg: ConfigRecord, context: Context, site: SiteSettings) -> Path | None:
    """The cohort manifest this site trains on: the server's (simulation), or the site's own
    copy named by its node config, refused unless it hashes to the gated cohort's digest."""
    digest = str(cfg.get("cohort-digest", ""))
    if not digest:
        path = str(cfg.get("cohort-manifest", ""))
        return Path(path) if path else None
    local = str(context.node_config.get("cohort", ""))
    if not local:
        raise SiteError(
            f"site {site.name!r}: the run trains on a synthetic cohort but this SuperNode's "
            "node config names none (--node-config \"cohort='…/manifest.csv'\")"
        )
    try:
        mine = cohort_digest(Path(local))
    except (OSError, ValueError) as exc:
        raise SiteError(f"site {site.name!r}: cohort {local}: {exc}") from None
    if mine != digest:
        raise SiteError(
            f"site {site.name!r}: cohort {local} is not the cohort the gate judged "
            f"(its files hash to {mine[:12]}…, the gated cohort's to {digest[:12]}…)"
        )
    return Path(local)


@app.train(mods=[secure_train_mod])
def train(msg: Message, context: Context) -> Message:
    """Local epochs on this site's real train cases (+ its cohort cases)."""
    config, cfg, site = prepare_site(msg, context)
    try:
        real = load_site_cases(config, site.manifest, site.name)
        cohort_path = _site_cohort(cfg, context, site)
        cohort = _cohort_cases(cohort_path, config, site.name) if cohort_path else None
        data = join(real, cohort)
        model = build_classifier(config)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
        server_round = int(cfg["server-round"])
        seed = round_seed(int(cfg["seed"]), "downstream", server_round, site.name)
        keep = None
        if config.downstream.keep_optimizer_state:
            store = OptimizerStateStore(site.audit_dir / "optimizer", f"downstream-{cfg['run-id']}")
            keep = (store, server_round)
        loss = train_epochs(
            model, data, config, epochs=int(cfg["local-epochs"]), seed=seed, optimizer_state=keep
        )
    except SiteError:
        raise
    except Exception as exc:
        raise SiteError(f"site {site.name!r}: {type(exc).__name__}: {exc}") from exc
    metrics = {
        "num-examples": len(data),
        "real": len(real),
        "synthetic": 0 if cohort is None else len(cohort),
        "site-index": site.index,
        "loss": loss,
    }
    return release(
        msg,
        site,
        phase="downstream",
        server_round=server_round,
        tensors=model.state_dict(),
        metrics=metrics,
    )


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The global model on this site's own split: on ``holdout`` (every round) per-class
    counts only; on ``test`` (once, at the end) probabilities and true labels."""
    config, cfg, site = prepare_site(msg, context)
    split = str(cfg.get("eval-split", "test"))
    try:
        if split not in ("holdout", "test"):
            raise SiteError(f"site {site.name!r}: unknown eval-split {split!r}")
        cases = load_site_cases(config, site.manifest, site.name, split)
        model = build_classifier(config)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=True)
        probs_np = predict(model, cases.images)
    except SiteError:
        raise
    except Exception as exc:
        raise SiteError(f"site {site.name!r}: {type(exc).__name__}: {exc}") from exc
    server_round = int(cfg.get("server-round", 0))
    if split == "holdout":
        k = config.labels.num_classes
        counts = class_counts(probs_np.reshape(-1, k), cases.labels.numpy(), k)
        released = holdout_count_metrics(*counts, cases=len(cases))
        return release(
            msg,
            site,
            phase="downstream-holdout",
            server_round=server_round,
            tensors={},
            metrics=released,
        )
    probs = torch.from_numpy(probs_np).float()
    # counted from the manifest: a deployed SuperNode need not read its train images again
    trained = sum(
        1 for r in read_manifest(site.manifest) if (r.site, r.split) == (site.name, "train")
    )
    released = {"num-examples": len(cases), "site-index": site.index, "train-real": trained}
    return release(
        msg,
        site,
        phase="downstream-test",
        server_round=server_round,
        tensors={"probs": probs, "labels": cases.labels.clone()},
        metrics=released,
    )


def downstream_server(
    grid: Grid,
    config: SynthctConfig,
    seed: int,
    *,
    cohort: Path | None = None,
    site_copies: bool = False,
    manifest: Path | None = None,
    site_root: Path | None = None,
    dp: ClassifierDP | None = None,
) -> ArmResult:
    """One federated arm: FedAvg with holdout early stopping, then every site's test
    probabilities. ``cohort`` (the server's manifest) adds synthetic cases: the sites read it
    (simulation) or, with ``site_copies`` (deployment), their own copies, checked against its
    digest. ``manifest``/``site_root``: the simulation's single-machine data, else None.
    ``dp``: the task's DP account (one for every arm and seed: they train on the same cases)."""
    start = time.perf_counter()
    digest = cohort_digest(cohort) if cohort is not None and site_copies else ""
    nodes = wait_for_sites(grid, config)
    torch.manual_seed(seed)
    model = build_classifier(config)
    base = ConfigRecord(
        {
            **task_config(config, "downstream", manifest=manifest, site_root=site_root),
            "cohort-manifest": "" if cohort is None or site_copies else str(cohort),
            "cohort-digest": digest,
            "seed": seed,
            "run-id": uuid.uuid4().hex[:12],  # names this arm's optimizer states at the sites
            "local-epochs": config.downstream.local_epochs,
        }
    )
    _, replies, converged = fedavg_then_evaluate(
        grid,
        nodes,
        config,
        initial=ArrayRecord(model.state_dict()),
        rounds=config.downstream.rounds,
        train_config=base,
        what="downstream",
        holdout_patience=config.downstream.patience_rounds,
        dp=dp,
    )
    probs, labels, sites = [], [], []
    train_cases = {"real": 0}
    for content in replies:
        arrays = content["arrays"].to_torch_state_dict()
        metrics = content["metrics"]
        name = config.site_names[int(metrics["site-index"])]
        probs.append(arrays["probs"].numpy())
        labels.append(arrays["labels"].numpy())
        sites += [name] * len(arrays["labels"])
        train_cases["real"] += int(metrics["train-real"])
    if cohort is not None:
        train_cases["synthetic"] = sum(1 for r in read_manifest(cohort) if r.split == "train")
    return ArmResult(
        probs=np.concatenate(probs),
        labels=np.concatenate(labels),
        sites=sites,
        train_cases=train_cases,
        wall_s=time.perf_counter() - start,
        stopping={"all": converged.as_dict()} if converged is not None else None,
    )


DOWNSTREAM_NOT_COVERED = [
    "each site's holdout counts per round (early stopping)",
    "each site's test-set class probabilities (final evaluation)",
]


def downstream_dp(config: SynthctConfig) -> ClassifierDP | None:
    """The downstream task's DP account when ``privacy.phases`` lists it, else None."""
    if not config.federated.dp_phase("downstream"):
        return None
    return ClassifierDP(config, "downstream", DOWNSTREAM_NOT_COVERED)


def train_downstream_federated(
    config: SynthctConfig,
    manifest: Path,
    cohort: Path | None,
    run_dir: Path,
    seed: int,
    dp: ClassifierDP | None = None,
) -> ArmResult:
    """One federated arm in Flower's simulation (one virtual SuperNode per site)."""
    from synthct.fed.app import client as unified_client
    from synthct.fed.simulation import simulate

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Path(manifest).resolve()
    cohort = Path(cohort).resolve() if cohort is not None else None
    return simulate(
        lambda grid: downstream_server(
            grid,
            config,
            seed,
            cohort=cohort,
            manifest=manifest,
            site_root=run_dir / "sites",
            dp=dp,
        ),
        unified_client,
        num_sites=len(config.site_names),
        run_dir=run_dir,
        client_cpus=config.federated.client_cpus,
        client_gpus=config.federated.num_gpus,
    )
