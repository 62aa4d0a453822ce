"""Secure aggregation of model updates with Flower's own SecAgg+ (``SecAggPlusWorkflow`` on the
server, ``secaggplus_mod`` on each site): the server learns the weighted mean of the sites'
updates and nothing about any one of them.

Flower 1.41 offers SecAgg+ only for its legacy FitIns/FitRes messages, so this module adapts
the project's Message-API apps to it (design and source references: docs/secagg_design.md):

- **Site** (``secure_train_mod``): under the protocol's "collect masked vectors" stage the
  site's unchanged train function runs on the global weights; the site then sends the
  **update** ``local - global`` of its floating tensors, refused if non-finite and clipped to
  the phase's L2 norm (Flower's ``clip_inputs_inplace``). ``secaggplus_mod`` weights it by the
  site's case count, quantises and masks it. The site's metrics (loss, steps, cases, audit
  chain head, update norm before clipping, digest of what it contributed) travel in plain text
  beside the masked vector, as they do without SecAgg.
- **Server** (``secure_round``): one ``SecAggPlusWorkflow`` run per round with a one-round
  legacy strategy that only keeps what the workflow hands it: the unmasked weighted mean
  update and each replying site's plain-text metrics. Sites that drop out after the key
  exchange are tolerated down to ``min_replies``; fewer, or a failure before the masks are
  agreed, halts the round (no aggregate, the round is logged as not aggregated).

Because the server never sees an individual update, server-side screening of update norms is
replaced by the sites' own clipping: one site can move the mean by at most its weight times
the clip norm. A malicious site can still send arbitrary masked integers (Flower 1.41 has no
proofs of input range); what the server checks is that the aggregate is finite and within the
clip norm.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.server import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from synthct.config import FederatedConfig
from synthct.fed.errors import SiteError

__all__ = [
    "SecAggSettings",
    "SecureRound",
    "secure_round",
    "apply_mean_update",
    "secure_train_mod",
    "settings_from_config",
    "site_weight_factor",
    "REQUIRE_NODE_KEY",
]

logger = logging.getLogger(__name__)

# keys the server adds to the FitIns config (removed before the site's train function sees it)
_KEYS, _CLIP, _UNIT = "secagg-keys", "secagg-clip-norm", "secagg-unit-weight"
# a SuperNode started with --node-config 'require-secagg=true' refuses plain training rounds
REQUIRE_NODE_KEY = "require-secagg"


@dataclass(frozen=True)
class SecAggSettings:
    """One secure round's protocol settings (``federated.secagg`` of the run's config)."""

    clip_norm: float  # L2 bound of each site's update, applied on the site
    max_weight: float  # >= the largest site's case count (a site with more refuses)
    min_replies: int  # fewest sites whose masked updates still aggregate (>= 2)
    quantization_range: int = 2**24
    modulus_range: int = 2**32
    timeout_s: float | None = None  # per protocol stage
    unit_weight: bool = False  # every site weighs 1 (DP), instead of its case count


@dataclass
class SecureRound:
    """What the server learnt from one secure round."""

    mean_update: dict[str, torch.Tensor] | None  # weighted mean of the float tensors' updates
    sites: list[dict[str, Any]] = field(default_factory=list)  # plain-text metrics per site
    failures: list[str] = field(default_factory=list)
    bytes_up: int = 0  # masked vectors only (int64 per element)
    bytes_down: int = 0  # the global weights in the stage that trains

    @property
    def aggregated(self) -> bool:
        return self.mean_update is not None


def settings_from_config(fed: FederatedConfig, phase: str, *, dp: bool = False) -> SecAggSettings:
    """The protocol settings of ``federated.secagg`` for one phase (``autoencoder``,
    ``decoder``, ``diffusion``, ``reference``, ``downstream``); under DP the updates are
    clipped to ``privacy.clipping_norm`` and weigh the same."""
    return SecAggSettings(
        clip_norm=fed.privacy.clipping_norm if dp else getattr(fed.secagg.clip_norm, phase),
        max_weight=float(fed.secagg.max_weight),
        min_replies=max(fed.secagg.min_replies, fed.min_sites),
        quantization_range=fed.secagg.quantization_range,
        timeout_s=fed.round_timeout_s,
        unit_weight=dp,
    )


def site_weight_factor(num_examples: int, settings: SecAggSettings) -> int:
    """The integer weight ``q`` the protocol gives a site (``secaggplus_mod``'s own formula):
    the mean it returns is ``sum(q_i * update_i) / sum(q_i)``."""
    if settings.unit_weight:  # the protocol then runs with max_weight 1 and weight 1
        return settings.quantization_range
    return round(num_examples / settings.max_weight * settings.quantization_range)


# -- site ------------------------------------------------------------------------------------


def secure_train_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: a "train" message of the SecAgg+ protocol goes through
    ``secaggplus_mod`` (only its masked-vector stage calls the site's train function, adapted
    by ``_update_for_secagg``); a plain "train" message is trained as usual unless the
    SuperNode requires secure aggregation."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, _update_for_secagg(call_next))
    cfg = msg.content.config_records.get("config")
    if cfg is not None and str(cfg.get("task", "")) == "plugin":
        # a plugin is one site's adapter by design, never aggregated; a site releases one
        # only with its own opt-in (contribute-plugins=true, checked by the plugin task)
        return call_next(msg, context)
    if _truthy(context.node_config.get(REQUIRE_NODE_KEY, False)):
        raise SiteError(
            "this site requires secure aggregation (node config "
            f"{REQUIRE_NODE_KEY}=true) and refuses a plain training round: set "
            "federated.secagg.enabled in the run's config"
        )
    return call_next(msg, context)


def _truthy(value: Any) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def _update_for_secagg(call_next: ClientAppCallable) -> ClientAppCallable:
    def train_and_send_update(msg: Message, context: Context) -> Message:
        fitins = recorddict_to_fitins(msg.content, keep_input=True)
        config = dict(fitins.config)
        keys = json.loads(str(config.pop(_KEYS)))
        clip = float(config.pop(_CLIP))
        unit = bool(config.pop(_UNIT))
        arrays = parameters_to_ndarrays(fitins.parameters)
        global_state = {k: torch.from_numpy(np.array(a)) for k, a in zip(keys, arrays, strict=True)}
        # the site's own train function sees the message it sees without SecAgg
        msg.content = RecordDict(
            {"arrays": ArrayRecord(global_state), "config": ConfigRecord(config)}
        )
        reply = call_next(msg, context)
        if reply.has_error():
            raise SiteError(f"local training failed: {reply.error.reason}")
        local = reply.content["arrays"].to_torch_state_dict()
        update = [
            (local[k].double() - global_state[k].double()).numpy()
            for k in keys
            if global_state[k].is_floating_point()
        ]
        if not all(np.isfinite(u).all() for u in update):
            raise SiteError("the local update holds NaN or Inf values; refused to send it")
        norm = get_norm(update)
        if norm > 0:  # Flower's clip divides by the norm; a zero update needs no clipping
            clip_inputs_inplace(update, clip)
        metrics = _plain_metrics(reply.content)
        cases = 1 if unit else int(metrics["num-examples"])
        _check_weight(context, cases)
        digest = hashlib.sha256()
        for u in update:
            digest.update(u.tobytes())
        metrics.update({"update-norm": norm, "update-sha256": digest.hexdigest()})
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), cases, metrics)
        return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    return train_and_send_update


def _plain_metrics(content: RecordDict) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for record in content.metric_records.values():
        metrics.update({k: v for k, v in record.items() if isinstance(v, int | float)})
    audit = content.config_records.get("audit")
    if audit is not None:
        metrics["audit-chain"] = str(audit["chain"])
    return metrics


def _check_weight(context: Context, cases: int) -> None:
    state = context.state.config_records[RECORD_KEY_STATE]
    max_weight = float(state["max_weight"])
    if cases > max_weight:
        raise SiteError(
            f"this site holds {cases} cases, more than federated.secagg.max_weight = "
            f"{max_weight:g}: its weighted update would overflow; raise max_weight"
        )


# -- server ----------------------------------------------------------------------------------


class _ErrorRecordingGrid(Grid):
    """The run's grid, noting every site error it delivers: when the protocol halts, the
    workflow keeps its failures to itself, and the round log must still say why."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.errors: list[str] = []

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Any:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Any) -> Any:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Any) -> Any:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any:
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.errors += [
            f"node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()
        ]
        return replies


class _OneRound(Strategy):
    """A legacy strategy for one SecAgg+ run: hands the workflow each site's FitIns and keeps
    what the workflow returns (the unmasked mean, identical in every result)."""

    def __init__(self, grid: Grid, fitins: dict[int, FitIns], min_replies: int) -> None:
        self.grid, self.fitins, self.min_replies = grid, fitins, min_replies
        self.results: list[tuple[Any, FitRes]] = []
        self.failures: list[Any] = []
        self.mean: list[np.ndarray] | None = None

    def initialize_parameters(self, client_manager):  # noqa: ANN001, ANN201
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        run_id = self.grid.run.run_id
        return [(GridClientProxy(n, self.grid, run_id), ins) for n, ins in self.fitins.items()]

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        self.results, self.failures = list(results), list(failures)
        if len(results) < self.min_replies:
            return None, {}
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001, ANN201
        return None


def apply_mean_update(
    global_state: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The new global weights: each float tensor moved by the secure mean update (added in
    float64, cast back to its dtype); tensors the protocol does not carry stay as they were."""
    return {
        k: (v.double() + mean[k]).to(v.dtype) if k in mean else v for k, v in global_state.items()
    }


def secure_round(
    grid: Grid,
    nodes: list[int],
    global_state: dict[str, torch.Tensor],
    config: ConfigRecord,
    server_round: int,
    settings: SecAggSettings,
) -> SecureRound:
    """One training round on ``nodes`` under SecAgg+: every site trains from ``global_state``
    with ``config`` (what a plain round's "config" record holds) and the server gets back the
    weighted mean of their clipped updates, float tensors only (others stay global)."""
    keys = list(global_state)
    float_keys = [k for k in keys if global_state[k].is_floating_point()]
    arrays = [global_state[k].detach().cpu().numpy() for k in keys]
    ins = FitIns(
        ndarrays_to_parameters(arrays),
        {
            **dict(config),
            "server-round": server_round,  # as Flower's Message-API strategies send it
            _KEYS: json.dumps(keys),
            _CLIP: float(settings.clip_norm),
            _UNIT: settings.unit_weight,
        },
    )
    grid = _ErrorRecordingGrid(grid)
    strategy = _OneRound(grid, {n: ins for n in nodes}, settings.min_replies)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        strategy=strategy,
    )
    context.state.config_records["config"] = ConfigRecord({"current_round": server_round})
    context.state.array_records["parameters"] = ArrayRecord()
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=settings.min_replies,
        max_weight=1.0 if settings.unit_weight else float(settings.max_weight),
        clipping_range=float(settings.clip_norm),
        quantization_range=settings.quantization_range,
        modulus_range=settings.modulus_range,
        timeout=settings.timeout_s,
    )
    workflow(grid, context)
    sites = [
        {"node": proxy.node_id, "num_examples": fitres.num_examples, **fitres.metrics}
        for proxy, fitres in strategy.results
    ]
    failures = grid.errors
    numel = sum(int(global_state[k].numel()) for k in float_keys)
    result = SecureRound(
        mean_update=None,
        sites=sites,
        failures=failures,
        bytes_up=8 * (numel + len(float_keys) + 1) * len(sites),
        # the global weights and any bytes in the config (the frozen autoencoder)
        bytes_down=(
            sum(a.nbytes for a in arrays)
            + sum(len(v) for v in dict(config).values() if isinstance(v, bytes))
        )
        * len(nodes),
    )
    if strategy.mean is None:
        logger.warning(
            "secure round %d halted or too few replies (%d, need %d): %s",
            server_round,
            len(sites),
            settings.min_replies,
            "; ".join(failures) or "a site dropped out before the masks were agreed",
        )
        return result
    mean = {
        k: torch.from_numpy(np.asarray(v, dtype=np.float64))
        for k, v in zip(float_keys, strategy.mean, strict=True)
    }
    if not all(bool(torch.isfinite(v).all()) for v in mean.values()):
        result.failures.append("the aggregated update is not finite; round discarded")
        return result
    norm = get_norm([v.numpy() for v in mean.values()])
    if norm > 1.01 * settings.clip_norm:  # a mean of clipped updates cannot be longer
        result.failures.append(
            f"the aggregated update's norm {norm:.4g} exceeds the clip norm "
            f"{settings.clip_norm:g}: a site sent out-of-range values; round discarded"
        )
        return result
    result.mean_update = mean
    return result
