"""Federated downstream classifier on Flower: FedAvg over the sites, then per-site evaluation.

Each site trains on its own real ``train`` cases plus the cohort cases meant for it (``site`` =
itself or ``pooled``). After every round it scores the global model on its own ``holdout``
split and sends per-class counts only; the server stops when the pooled holdout score stalls
(``downstream.patience_rounds``) and keeps the best round. Each site then evaluates that model on its
own ``test`` split; only weights, holdout counts and the test-set class probabilities (with
their labels) leave a site. The training loop is Flower's own ``FedAvg.start`` (weighted by
cases); the final evaluation round is sent explicitly so every site's results are collected,
not just their average.
"""

from __future__ import annotations

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
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

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
from synthct.data.manifest import read_manifest
from synthct.fed.errors import SiteError
from synthct.fed.fedavg_run import fedavg_then_evaluate, holdout_count_metrics
from synthct.fed.secagg import secure_train_mod
from synthct.fed.sites import prepare_site, task_config, wait_for_sites
from synthct.fed.task import OptimizerStateStore, load_site_cases, round_seed

__all__ = ["app", "train_downstream_federated"]

logger = logging.getLogger(__name__)

app = ClientApp()


@app.train(mods=[secure_train_mod])
def train(msg: Message, context: Context) -> Message:
    """Local epochs on this site's real train cases (+ its cohort cases)."""
    config, cfg, site = prepare_site(msg, context)
    try:
        real = load_site_cases(config, site.manifest, site.name)
        cohort_path = str(cfg.get("cohort-manifest", ""))
        cohort = load_cohort_for(Path(cohort_path), config, site.name) if cohort_path else None
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
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


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
    if split == "holdout":
        k = config.labels.num_classes
        counts = class_counts(probs_np.reshape(-1, k), cases.labels.numpy(), k)
        metrics = MetricRecord(holdout_count_metrics(*counts, cases=len(cases)))
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
    probs = torch.from_numpy(probs_np).float()
    arrays = ArrayRecord({"probs": probs, "labels": cases.labels.clone()})
    metrics = MetricRecord({"num-examples": len(cases), "site-index": site.index})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _server(
    grid: Grid,
    config: SynthctConfig,
    manifest: Path,
    cohort: Path | None,
    seed: int,
    run_dir: Path,
) -> ArmResult:
    start = time.perf_counter()
    nodes = wait_for_sites(grid, config)
    torch.manual_seed(seed)
    model = build_classifier(config)
    base = ConfigRecord(
        {
            **task_config(config, "downstream", manifest=manifest, site_root=run_dir / "sites"),
            "cohort-manifest": "" if cohort is None else str(cohort),
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
    )
    probs, labels, sites = [], [], []
    for content in replies:
        arrays = content["arrays"].to_torch_state_dict()
        name = config.site_names[int(content["metrics"]["site-index"])]
        probs.append(arrays["probs"].numpy())
        labels.append(arrays["labels"].numpy())
        sites += [name] * len(arrays["labels"])
    train_cases = {"real": sum(1 for r in read_manifest(manifest) if r.split == "train")}
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


def train_downstream_federated(
    config: SynthctConfig, manifest: Path, cohort: Path | None, run_dir: Path, seed: int
) -> ArmResult:
    """One federated arm in Flower's simulation (one virtual SuperNode per site)."""
    from synthct.fed.app import client as unified_client
    from synthct.fed.simulation import simulate

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Path(manifest).resolve()
    cohort = Path(cohort).resolve() if cohort is not None else None
    return simulate(
        lambda grid: _server(grid, config, manifest, cohort, seed, run_dir),
        unified_client,
        num_sites=len(config.site_names),
        run_dir=run_dir,
        client_cpus=config.federated.client_cpus,
        client_gpus=config.federated.num_gpus,
    )
