"""Federated gate on Flower: every site scores the cohort against its own real cases.

Nobody holds all sites' real data. The server holds the (synthetic) cohort and the reference
models; it sends both to every site in two query rounds (:mod:`synthct.eval.site_statistics`
says what each round returns) and judges the pooled aggregates with the same rules as the
central gate. What leaves a site is written to its audit log first. A gate judges on all the
evidence or none: a site that fails or does not answer stops it with an error naming the site.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from synthct.artifacts import sha256_bytes
from synthct.config import SynthctConfig
from synthct.data.dataset import load_cases
from synthct.eval.features import extract_features
from synthct.eval.gate import (
    DEFAULT_RULES,
    GateError,
    RuleSpec,
    featurise_cohort,
    gate_report,
    hash_cohort,
)
from synthct.eval.metrics import cohort_request, combine_evidence, combine_summary
from synthct.eval.privacy import prepare_for_matching
from synthct.eval.site_statistics import (
    SiteData,
    site_evidence,
    site_summary,
    withhold_small_classes,
)
from synthct.fed.errors import FederatedError, SiteError
from synthct.fed.payload import tensors_from_bytes, tensors_to_bytes
from synthct.fed.site_state import ProcessCache
from synthct.fed.sites import prepare_site, release, task_config, wait_for_sites
from synthct.reference import ReferenceModel, ReferenceNet

__all__ = ["app", "run_gate_federated"]

logger = logging.getLogger(__name__)

app = ClientApp()

_SITE_CACHE = ProcessCache()  # (manifest, mtime, site, reference sha256) -> SiteData


def _reference_from(cfg: ConfigRecord) -> ReferenceModel:
    """The reference models the server sent (hash-checked safetensors, never pickle)."""
    meta = json.loads(str(cfg["reference-meta"]))
    state = tensors_from_bytes(
        bytes(cfg["reference-safetensors"]), sha256=str(cfg["reference-sha256"]), what="reference"
    )
    net = ReferenceNet(len(meta["classes"]), tuple(meta["channels"]))
    net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    return ReferenceModel(net, meta["classes"], meta["vocabulary_hash"], {})


def _site_data(config: SynthctConfig, manifest: Path, site: str, cfg: ConfigRecord) -> SiteData:
    """This site's train and holdout cases, featurised once per (manifest, reference)."""
    key = (str(manifest.resolve()), manifest.stat().st_mtime, site, str(cfg["reference-sha256"]))
    return _SITE_CACHE.get(key, lambda: _featurise_site(config, manifest, site, cfg))


def _featurise_site(
    config: SynthctConfig, manifest: Path, site: str, cfg: ConfigRecord
) -> SiteData:
    """Read the site's train and holdout cases and compute what the gate's statistics need."""
    reference = _reference_from(cfg)
    window = config.data.hu_window
    splits = {
        split: load_cases(manifest, config, splits=(split,), sites=(site,))
        for split in ("train", "holdout")
    }
    for split, cases in splits.items():
        if len(cases) == 0:
            raise SiteError(f"site {site!r}: no {split} cases in {manifest}")
    features = {
        split: extract_features(c.images, c.labels, c.sites, reference, window)
        for split, c in splits.items()
    }
    return SiteData(
        train=features["train"],
        holdout=features["holdout"],
        train_match=prepare_for_matching(splits["train"].images, window),
        holdout_match=prepare_for_matching(splits["holdout"].images, window),
        holdout_pred=reference.predict(splits["holdout"].images).argmax(1).numpy(),
    )


def _to_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in arrays.items():
        value = np.asarray(value)
        dtype = np.int64 if value.dtype.kind in "biu" else np.float64
        out[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=dtype))
    return out


def _from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.to_torch_state_dict().items()}


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Round ``summary`` or ``evidence`` of the federated gate at this site."""
    config, cfg, site = prepare_site(msg, context)
    step = str(cfg["gate-step"])
    try:
        mine = _site_data(config, site.manifest, site.name, cfg)
        # the small-class guard counts per class over the site: every case must be the site's
        # own, or a block of another scanner's few cases could leave under its name
        others = (set(mine.train.sites) | set(mine.holdout.sites)) - {site.name}
        if others:
            raise SiteError(f"site {site.name!r}: cases labelled {sorted(others)} in its data")
        data, withheld = withhold_small_classes(
            mine, len(config.labels.classes), config.federated.min_class_cases
        )
        if step == "summary":
            arrays = {**site_summary(data, len(config.labels.classes)), "withheld": withheld}
        elif step == "evidence":
            request = _from_record(msg.content["arrays"])
            images = torch.from_numpy(request.pop("cohort_images")).float()
            cohort_match = prepare_for_matching(images, config.data.hu_window)
            arrays = site_evidence(data, request, cohort_match, site.index)
        else:
            raise SiteError(f"site {site.name!r}: unknown gate step {step!r}")
    except SiteError:
        raise
    except Exception as exc:
        raise SiteError(f"site {site.name!r}: {type(exc).__name__}: {exc}") from exc
    tensors = _to_tensors(arrays)
    metrics = {"site-index": site.index}
    return release(
        msg,
        site,
        phase=f"gate-{step}",
        server_round=1 if step == "summary" else 2,
        tensors=tensors,
        metrics=metrics,
    )


def _ask(
    grid: Grid,
    nodes: list[int],
    config: SynthctConfig,
    base: ConfigRecord,
    step: str,
    arrays: dict[str, np.ndarray] | None = None,
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """One query round to every site; (site, arrays) in site order, or an error naming the
    sites that failed or did not answer."""
    cfg = ConfigRecord({**dict(base), "gate-step": step})
    messages = []
    for node in nodes:
        content = RecordDict({"config": cfg})
        if arrays is not None:
            content["arrays"] = ArrayRecord(_to_tensors(arrays))
        messages.append(Message(content=content, message_type=MessageType.QUERY, dst_node_id=node))
    replies = list(grid.send_and_receive(messages, timeout=config.federated.round_timeout_s))
    errors = [r.error.reason for r in replies if r.has_error()]
    if errors or len(replies) < len(nodes):
        missing = len(nodes) - len(replies)
        why = "; ".join(errors) + (f"; {missing} site(s) did not answer" if missing else "")
        raise FederatedError(f"federated gate, {step} round: {why.strip('; ')}")
    out = []
    for reply in replies:
        name = config.site_names[int(reply.content["metrics"]["site-index"])]
        out.append((name, _from_record(reply.content["arrays"])))
    return sorted(out, key=lambda item: config.site_names.index(item[0]))


def _judge(
    grid: Grid,
    nodes: list[int],
    config: SynthctConfig,
    cohort_manifest: Path,
    manifest: Path | None,
    reference: ReferenceModel,
    rules: dict[str, RuleSpec],
    seed: int,
    bootstrap: int,
    site_root: Path | None,
    roster: list[str] | None = None,
) -> dict[str, Any]:
    files, listed = hash_cohort(cohort_manifest)
    cohort = load_cases(cohort_manifest, config, splits=("train",))
    if len(cohort) == 0:
        raise GateError(f"{cohort_manifest}: no cases with split 'train' (synthetic cases train)")
    side = featurise_cohort(cohort, reference, config.data.hu_window)
    weights = tensors_to_bytes(reference.net.state_dict())
    meta = {
        "classes": reference.classes,
        "vocabulary_hash": reference.vocabulary_hash,
        "channels": list(reference.net.channels),
    }
    base = ConfigRecord(
        {
            **task_config(config, "gate", manifest=manifest, site_root=site_root, roster=roster),
            "reference-safetensors": weights,
            "reference-sha256": sha256_bytes(weights),
            "reference-meta": json.dumps(meta),
        }
    )
    summaries = _ask(grid, nodes, config, base, "summary")
    classes = list(config.labels.classes)
    not_evaluated = {
        name: [classes[c] for c in np.flatnonzero(arrays.pop("withheld"))]
        for name, arrays in summaries
    }
    not_evaluated = {name: held for name, held in not_evaluated.items() if held}
    if not_evaluated:
        logger.info("federated gate: classes not evaluated (too few cases) %s", not_evaluated)
    plan = combine_summary([arrays for _, arrays in summaries])
    logger.info("federated gate: %d sites summarised", len(summaries))
    request = cohort_request(plan, side, seed)
    request["cohort_images"] = cohort.images.numpy()
    evidence = _ask(grid, nodes, config, base, "evidence", request)
    metrics, per_volume = combine_evidence(
        [arrays for _, arrays in evidence],
        [name for name, _ in evidence],
        plan,
        side,
        classes=classes,
        requested=cohort.labels.numpy(),
        bootstrap=bootstrap,
        seed=seed,
    )
    real = {
        "mode": "federated",
        "sites": [name for name, _ in evidence],
        "train_cases": int(plan.count_train.sum()),
        "holdout_cases": int(plan.count_holdout.sum()),
        # classes a site holds fewer than federated.min_class_cases of: it sent nothing on them
        "min_class_cases": config.federated.min_class_cases,
        "not_evaluated": not_evaluated,
    }
    return gate_report(
        metrics,
        per_volume,
        rules,
        cohort=cohort,
        files=files,
        listed=listed,
        config=config,
        real=real,
        reference=reference,
        seed=seed,
    )


def gate_server(
    grid: Grid,
    config: SynthctConfig,
    cohorts: list[Path],
    nodes: list[int] | None = None,
    **kwargs,
) -> list[dict]:
    """The federated gate's reports for ``cohorts`` on ``grid`` (``_judge``'s settings as
    keywords; ``manifest``/``site_root`` None in a deployment). ``nodes``: judge with these
    sites only (``config`` naming just them), e.g. a plugin's own site."""
    nodes = nodes if nodes is not None else wait_for_sites(grid, config)
    if len(nodes) < len(config.site_names):
        raise FederatedError(
            f"federated gate: {len(nodes)} of {len(config.site_names)} sites connected; "
            "the gate judges on every site's evidence"
        )
    return [_judge(grid, nodes, config, cohort, **kwargs) for cohort in cohorts]


def run_gate_federated(
    cohort_manifests: str | Path | list[str | Path],
    manifest: str | Path,
    *,
    config: SynthctConfig,
    reference: ReferenceModel,
    run_dir: str | Path,
    rules: dict[str, RuleSpec] | None = None,
    seed: int = 0,
    bootstrap: int = 200,
) -> dict[str, Any] | list[dict[str, Any]]:
    """The gate report of a cohort (a list of reports for a list of cohorts, judged in one
    run) by the sites in Flower's simulation: one virtual SuperNode per site, each reading
    only its own rows of ``manifest``."""
    from synthct.fed.app import client as unified_client
    from synthct.fed.simulation import simulate

    if reference.vocabulary_hash != config.labels.vocabulary_hash:
        raise GateError("the reference models were trained on another label vocabulary")
    single = not isinstance(cohort_manifests, list)
    cohorts = [Path(c).resolve() for c in ([cohort_manifests] if single else cohort_manifests)]
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    reports = simulate(
        lambda grid: gate_server(
            grid,
            config,
            cohorts,
            manifest=Path(manifest).resolve(),
            reference=reference,
            rules=rules or dict(DEFAULT_RULES),
            seed=seed,
            bootstrap=bootstrap,
            site_root=run_dir / "sites",
        ),
        unified_client,
        num_sites=len(config.site_names),
        run_dir=run_dir,
        client_cpus=config.federated.client_cpus,
        client_gpus=config.federated.num_gpus,
    )
    return reports[0] if single else reports
