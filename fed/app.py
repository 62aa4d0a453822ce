"""One Flower app for every federated task: the generator's training, the reference
classifier, the gate, the downstream classifiers and a site's plugin contribution, in Flower's
simulation and on a SuperLink with SuperNodes alike.

Every synthct message carries the task it belongs to in its config record (``task``, see
``fed/sites.task_config``); the ClientApp here routes each message to that task's handler
(``fed/client_app.py``, ``reference_app.py``, ``gate_app.py``, ``downstream_app.py``,
``plugin_app.py``), behind
the SecAgg+ mod. The ServerApp runs the task named by the run config (``flwr run APP
--run-config "task='gate' ..."``): settings are paths on the SuperLink's machine; each site's
data comes from its SuperNode's node config (``site``, ``manifest``, ``audit-dir`` and, for
the downstream task with a cohort, ``cohort``: the site's copy of the gated cohort; for a
plugin contribution, ``generator`` and ``contribute-plugins=true``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp import Grid, ServerApp

from synthct.config import load_config
from synthct.fed import client_app, downstream_app, gate_app, plugin_app, reference_app
from synthct.fed.errors import FederatedError, SiteError
from synthct.fed.secagg import secure_train_mod
from synthct.fed.sites import DEPLOYED_PULL_INTERVAL_S, PromptGrid

__all__ = ["client", "server", "TASKS"]

logger = logging.getLogger(__name__)

TASKS = ("generator", "reference", "gate", "downstream", "plugin")

# (message kind, task) -> the task's handler
_HANDLERS: dict[tuple[str, str], ClientAppCallable] = {
    ("train", "generator"): client_app.train,
    ("query", "generator"): client_app.query,
    ("train", "reference"): reference_app.train,
    ("evaluate", "reference"): reference_app.evaluate,
    ("query", "gate"): gate_app.query,
    ("train", "downstream"): downstream_app.train,
    ("evaluate", "downstream"): downstream_app.evaluate,
    ("train", "plugin"): plugin_app.contribute,
}

client = ClientApp()


def _route(kind: str, msg: Message, context: Context) -> Message:
    cfg = msg.content.config_records.get("config")
    task = str(cfg.get("task", "generator")) if cfg is not None else "generator"
    handler = _HANDLERS.get((kind, task))
    if handler is None:
        raise SiteError(f"no {kind} handler for task {task!r} (tasks: {', '.join(TASKS)})")
    return handler(msg, context)


@client.train(mods=[secure_train_mod])
def train(msg: Message, context: Context) -> Message:
    """A training round of the message's task (under SecAgg+ when the server runs it)."""
    return _route("train", msg, context)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """An evaluation of the message's task (a site scores on its own split)."""
    return _route("evaluate", msg, context)


@client.query()
def query(msg: Message, context: Context) -> Message:
    """A statistics query of the message's task (latent moments, gate summaries)."""
    return _route("query", msg, context)


server = ServerApp()


def _path(value: object, key: str, task: str) -> Path:
    if not str(value):
        raise FederatedError(f"task {task!r} needs the run config's {key!r} (a path on the server)")
    return Path(str(value))


def _downstream(grid: Grid, config, rc, out: Path) -> None:
    """Real-only and (with ``cohort``: a gated cohort folder on the server) real + synthetic
    federated classifiers over ``downstream.seeds``; each site trains on its own copy of the
    cohort, checked against the gated one's digest. Writes ``out/results.json``."""
    from synthct.artifacts import write_json
    from synthct.eval.classification import downstream_payload
    from synthct.eval.gate import gated_cohort

    cohort_dir = Path(str(rc.get("cohort", ""))) if str(rc.get("cohort", "")) else None
    gate = str(rc.get("gate", ""))
    gate_info, cohort = gated_cohort(
        cohort_dir,
        Path(gate) if gate else None,
        bool(rc.get("force-ungated", False)),
        [k for k in str(rc.get("trusted-keys", "")).split(",") if k],
    )
    arms = {"real": None, **({"real+synthetic": cohort} if cohort is not None else {})}
    dp = downstream_app.downstream_dp(config)  # one account over every arm and seed
    results = {
        arm: [
            (
                seed,
                downstream_app.downstream_server(
                    grid, config, seed, cohort=use, site_copies=True, dp=dp
                ),
            )
            for seed in config.downstream.seeds
        ]
        for arm, use in arms.items()
    }
    out.mkdir(parents=True, exist_ok=True)
    payload = downstream_payload(
        results,
        config=config,
        mode="federated (deployment)",
        cohort=None if cohort_dir is None else str(cohort_dir),
        gate=gate_info,
        test_cases=len(results["real"][0][1].labels),
        **({"privacy": dp.record()} if dp else {}),
    )
    write_json(out / "results.json", payload, kind="synthct-downstream")


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Run the task the run config names; its result is written under ``out``."""
    # poll often (Flower's deployed grid sleeps 3 s); never slower than the grid itself would
    interval = min(DEPLOYED_PULL_INTERVAL_S, getattr(grid, "pull_interval", 3.0))
    grid = PromptGrid(grid, pull_interval=interval)
    rc = context.run_config
    task = str(rc.get("task", "generator"))
    config = load_config(str(rc.get("config", "demo")))  # a server-side path or a packaged name
    out = Path(str(rc.get("out", "runs/federated")))
    seed = int(rc.get("seed", 0))
    if task == "generator":
        from synthct.fed.server_app import FederatedJob, run_federated

        max_rounds = int(rc.get("max-rounds", 0)) or None
        job = FederatedJob(config, out, resume=bool(rc.get("resume", False)), max_rounds=max_rounds)
        run_federated(grid, job)
    elif task == "reference":
        from synthct.reference import save_reference

        model = reference_app.reference_server(grid, config, None, out / "federated", seed)
        save_reference(model, out)
    elif task == "gate":
        from synthct.eval.gate import load_rules, write_gate
        from synthct.reference import load_reference

        reference = load_reference(
            _path(rc.get("reference", ""), "reference", task),
            vocabulary_hash=config.labels.vocabulary_hash,
        )
        (report,) = gate_app.gate_server(
            grid,
            config,
            [_path(rc.get("cohort", ""), "cohort", task)],
            manifest=None,
            reference=reference,
            rules=load_rules(str(rc.get("rules", "")) or None),
            seed=seed,
            bootstrap=int(rc.get("bootstrap", 200)),
            site_root=None,
        )
        sign = str(rc.get("sign-key", ""))
        out.mkdir(parents=True, exist_ok=True)
        write_gate(report, out / "gate.json", sign_with=Path(sign) if sign else None)
    elif task == "downstream":
        _downstream(grid, config, rc, out)
    elif task == "plugin":
        from synthct.pretrained import generator_folder

        gate, accept = None, str(rc.get("accept", "gate"))
        if accept not in ("gate", "none"):
            raise FederatedError(f"run config accept={accept!r}: 'gate' or 'none'")
        if accept == "gate":
            from synthct.eval.gate import load_rules
            from synthct.reference import load_reference

            gate = plugin_app.PluginGate(
                load_reference(
                    _path(rc.get("reference", ""), "reference", task),
                    vocabulary_hash=config.labels.vocabulary_hash,
                ),
                load_rules(str(rc.get("rules", "")) or None),
                cases_per_class=int(rc.get("gate-cases", 8)),
                bootstrap=int(rc.get("bootstrap", 200)),
            )
        plugin_app.contribute_server(
            grid,
            config,
            site=str(rc.get("site", "")),
            generator_dir=generator_folder(str(_path(rc.get("generator", ""), "generator", task))),
            registry=_path(rc.get("registry", ""), "registry", task),
            seed=seed,
            steps=int(rc.get("steps", 0)),
            decoder_rank=int(rc.get("decoder-rank", 0)),
            gate=gate,
        )
    else:
        raise FederatedError(f"run config task {task!r}: deployable tasks are {', '.join(TASKS)}")
    logger.info("task %s done: %s", task, out)
