"""SecAgg+ through Flower's own protocol: the server never holds one site's update, the
aggregate equals FedAvg, sites may drop out after the key exchange, hostile values are refused.

Messages travel between the real ``SecAggPlusWorkflow`` and real ClientApps (with
``secure_train_mod`` and Flower's ``secaggplus_mod``) serialised as Flower's protobuf, in one
process: ``WireGrid`` stands in for the SuperLink's transport only, and keeps every byte the
sites send so the tests can look for an update in it.
"""

from __future__ import annotations

import itertools
import math
import uuid
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid

from synthct.fed.rounds import RoundRequest, make_strategy, secure_aggregated_round
from synthct.fed.secagg import (
    REQUIRE_NODE_KEY,
    SecAggSettings,
    secure_round,
    secure_train_mod,
    site_weight_factor,
)

SERVER = 1  # the node id the server_identity fixture gives the ServerApp


pytestmark = pytest.mark.usefixtures("server_identity")


class WireGrid(Grid):
    """Delivers each message to its node's ClientApp over serialised protobuf bytes."""

    def __init__(self, apps: dict[int, tuple[ClientApp, Context]]) -> None:
        self.apps = apps
        self.replies: list[bytes] = []  # every byte string a site sent
        self._ids = itertools.count()

    def set_run(self, run: Any) -> None:  # noqa: D102
        pass

    @property
    def run(self) -> Any:  # noqa: D102
        return type("Run", (), {"run_id": 7})()

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201, D102
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:  # noqa: D102
        return list(self.apps)

    def push_messages(self, messages):  # noqa: ANN001, ANN201, D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201, D102
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201, D102
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            msg.metadata.__dict__["_src_node_id"] = SERVER
            msg.metadata.__dict__["_run_id"] = 7
            wire = message_to_proto(msg).SerializeToString()
            received = message_from_proto(ProtoMessage.FromString(wire))
            app, context = self.apps[received.metadata.dst_node_id]
            try:
                reply = app(received, context)
            except Exception as exc:  # what a SuperNode reports for a failed ClientApp
                reply = Message(
                    Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=received
                )
            data = message_to_proto(reply).SerializeToString()
            self.replies.append(data)
            out.append(message_from_proto(ProtoMessage.FromString(data)))
        return out


def _site_app(
    update: dict[str, torch.Tensor], cases: int, fail_on_train: bool = False, index: int = 0
) -> ClientApp:
    app = ClientApp()

    @app.train(mods=[secure_train_mod])
    def train(msg: Message, context: Context) -> Message:
        if fail_on_train:
            raise RuntimeError("site lost power")
        weights = msg.content["arrays"].to_torch_state_dict()
        local = {k: v + update[k] if k in update else v.clone() for k, v in weights.items()}
        content = RecordDict(
            {
                "arrays": ArrayRecord(local),
                "metrics": MetricRecord(
                    {"num-examples": cases, "loss": 0.25, "steps": 3, "site-index": index}
                ),
                "audit": ConfigRecord({"chain": "f" * 64}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


GLOBAL = {
    "conv.weight": torch.linspace(-1, 1, 60).reshape(3, 4, 5),
    "conv.bias": torch.ones(3),
    "bn.num_batches_tracked": torch.tensor(12),
}


def _updates(n_sites: int, scale: float = 0.05, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "conv.weight": scale * torch.randn(3, 4, 5, generator=gen),
            "conv.bias": scale * torch.randn(3, generator=gen),
        }
        for _ in range(n_sites)
    ]


def _world(updates, cases, node_config=None, failing=()):  # noqa: ANN001, ANN202
    apps = {}
    for i, (update, n) in enumerate(zip(updates, cases, strict=True)):
        node = 100 + i
        context = Context(
            run_id=7,
            node_id=node,
            node_config=dict(node_config or {}),
            state=RecordDict(),
            run_config={},
        )
        apps[node] = (_site_app(update, n, fail_on_train=i in failing, index=i), context)
    return WireGrid(apps)


SETTINGS = SecAggSettings(clip_norm=4.0, max_weight=64, min_replies=2)


def _fedavg(updates, cases) -> dict[str, torch.Tensor]:  # noqa: ANN001
    total = sum(cases)
    return {
        k: sum(u[k].double() * n for u, n in zip(updates, cases, strict=True)) / total
        for k in updates[0]
    }


def test_the_server_gets_the_case_weighted_mean_and_never_one_sites_update():
    updates, cases = _updates(3), [10, 30, 60]
    grid = _world(updates, cases)
    result = secure_round(
        grid, grid.get_node_ids(), GLOBAL, ConfigRecord({"phase": "x"}), 1, SETTINGS
    )
    assert result.aggregated and not result.failures
    expected = _fedavg(updates, cases)
    # each element is stochastically rounded to a step of 2 C / T before weighting
    tolerance = len(cases) * 2 * SETTINGS.clip_norm / SETTINGS.quantization_range + 1e-7
    assert set(result.mean_update) == {"conv.weight", "conv.bias"}  # the int buffer stays global
    for key, value in expected.items():
        assert torch.allclose(result.mean_update[key], value, atol=tolerance), key
    # what crossed the wire from the sites: neither the update nor the local weights
    for update in updates:
        local = (GLOBAL["conv.weight"] + update["conv.weight"]).numpy()
        for raw in (
            update["conv.weight"].numpy().tobytes(),
            update["conv.weight"].double().numpy().tobytes(),
            local.tobytes(),
        ):
            assert not any(raw in reply for reply in grid.replies)
    # plain-text metrics per site, as without SecAgg
    assert sorted(s["num_examples"] for s in result.sites) == cases
    assert all(s["audit-chain"] == "f" * 64 and s["loss"] == 0.25 for s in result.sites)
    assert all(len(s["update-sha256"]) == 64 for s in result.sites)


def test_masked_vectors_look_random_and_only_their_sum_means_anything():
    """Decode one site's masked upload as if it were unmasked: it bears no relation to the
    site's update (correlation ~ 0), while the sum of all of them does."""
    updates, cases = _updates(3, seed=1), [20, 20, 20]
    grid = _world(updates, cases)
    secure_round(grid, grid.get_node_ids(), GLOBAL, ConfigRecord({}), 1, SETTINGS)
    stage2 = [message_from_proto(ProtoMessage.FromString(r)) for r in grid.replies[6:9]]
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    for reply in stage2:
        assert not reply.content.array_records or all(
            len(rec) == 0 for rec in reply.content.array_records.values()
        )
        masked = [
            bytes_to_ndarray(b)
            for b in reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        ]
        weights = masked[1].astype(np.float64).ravel()  # element 0 is the weight factor
        assert weights.min() >= 0 and weights.max() < 2**32
        for update in updates:
            corr = np.corrcoef(weights, update["conv.weight"].numpy().ravel())[0, 1]
            assert abs(corr) < 0.5


def test_a_site_that_drops_out_after_the_key_exchange_is_tolerated():
    updates, cases = _updates(3, seed=2), [10, 20, 30]
    grid = _world(updates, cases, failing={0})
    result = secure_round(grid, grid.get_node_ids(), GLOBAL, ConfigRecord({}), 1, SETTINGS)
    assert result.aggregated
    assert len(result.sites) == 2 and any("site lost power" in f for f in result.failures)
    expected = _fedavg(updates[1:], cases[1:])
    tolerance = 3 * 2 * SETTINGS.clip_norm / SETTINGS.quantization_range + 1e-7
    for key, value in expected.items():
        assert torch.allclose(result.mean_update[key], value, atol=tolerance), key


def test_below_the_threshold_the_round_halts_without_an_aggregate():
    updates, cases = _updates(3, seed=3), [10, 20, 30]
    grid = _world(updates, cases, failing={0, 1})
    result = secure_round(grid, grid.get_node_ids(), GLOBAL, ConfigRecord({}), 1, SETTINGS)
    assert not result.aggregated


def test_an_outsized_update_is_clipped_on_the_site_and_a_nan_update_is_refused():
    updates, cases = _updates(3, seed=4), [10, 10, 10]
    updates[0] = {k: v * 1000 for k, v in updates[0].items()}  # norm far above the clip
    grid = _world(updates, cases)
    result = secure_round(grid, grid.get_node_ids(), GLOBAL, ConfigRecord({}), 1, SETTINGS)
    norm0 = float(torch.sqrt(sum(v.double().pow(2).sum() for v in updates[0].values())))
    clipped = {k: v.double() * SETTINGS.clip_norm / norm0 for k, v in updates[0].items()}
    expected = _fedavg([clipped, *updates[1:]], cases)
    for key, value in expected.items():
        assert torch.allclose(result.mean_update[key], value, atol=1e-5), key
    reported = {round(s["update-norm"], 3) for s in result.sites}
    assert round(norm0, 3) in reported  # the site reports its norm before clipping

    updates[1]["conv.bias"][0] = float("nan")
    grid = _world(updates, cases)
    result = secure_round(grid, grid.get_node_ids(), GLOBAL, ConfigRecord({}), 1, SETTINGS)
    assert result.aggregated and len(result.sites) == 2
    assert any("NaN or Inf" in f for f in result.failures)


def test_unit_weights_average_sites_equally():
    updates, cases = _updates(2, seed=5), [5, 50]
    grid = _world(updates, cases)
    unit = SecAggSettings(clip_norm=4.0, max_weight=64, min_replies=2, unit_weight=True)
    result = secure_round(grid, grid.get_node_ids(), GLOBAL, ConfigRecord({}), 1, unit)
    expected = _fedavg(updates, [1, 1])
    for key, value in expected.items():
        assert torch.allclose(result.mean_update[key], value, atol=1e-5), key
    assert site_weight_factor(50, unit) == site_weight_factor(5, unit)


def test_a_site_that_requires_secagg_refuses_a_plain_round_and_one_over_max_weight_refuses():
    app = _site_app(_updates(1)[0], 10)
    context = Context(
        run_id=7,
        node_id=5,
        node_config={REQUIRE_NODE_KEY: "true"},
        state=RecordDict(),
        run_config={},
    )
    plain = Message(
        RecordDict({"arrays": ArrayRecord(GLOBAL), "config": ConfigRecord({})}), 5, "train"
    )
    plain.metadata.__dict__["_message_id"] = "m1"
    plain.metadata.__dict__["_src_node_id"] = SERVER
    with pytest.raises(Exception, match="requires secure aggregation"):
        app(plain, context)
    # a plugin request is one site's adapter by design, never aggregated: the site's own
    # opt-in (checked by the plugin task) decides, not the secure-aggregation requirement
    plugin = Message(
        RecordDict({"arrays": ArrayRecord(GLOBAL), "config": ConfigRecord({"task": "plugin"})}),
        5,
        "train",
    )
    plugin.metadata.__dict__["_message_id"] = "m2"
    plugin.metadata.__dict__["_src_node_id"] = SERVER
    assert app(plugin, context).content["metrics"]["num-examples"] == 10

    updates = _updates(2, seed=6)
    grid = _world(updates, [10, 100])  # 100 > max_weight 64
    result = secure_round(grid, grid.get_node_ids(), GLOBAL, ConfigRecord({}), 1, SETTINGS)
    assert not result.aggregated
    assert any("max_weight" in f for f in result.failures)


def test_under_dp_a_round_with_a_dropout_is_noised_for_the_replies_and_accounted(smoke_config):
    """The generator's secure round under DP: the noise on the mean of the two sites that
    replied is z * C / 2 (not / 3, the sites asked), and the release is accounted."""
    fed = smoke_config.federated
    privacy = fed.privacy.model_copy(
        update={"enabled": True, "noise_multiplier": 2.0, "clipping_norm": 0.5}
    )
    secagg = fed.secagg.model_copy(update={"enabled": True, "min_replies": 2})
    fed = fed.model_copy(update={"privacy": privacy, "secagg": secagg, "min_sites": 2})
    config = smoke_config.model_copy(update={"federated": fed})
    assert len(config.site_names) >= 3 and config.federated.dp_phase("diffusion")

    model = torch.nn.Module()
    model.register_parameter("w", torch.nn.Parameter(torch.zeros(200_000)))
    zeros = [{"w": torch.zeros(200_000)} for _ in range(3)]
    grid = _world(zeros, [10, 20, 30], failing={0})
    strategy = make_strategy(config, "diffusion", 3)
    request = RoundRequest(
        grid, config, model, strategy, "diffusion", 1, ConfigRecord({}), grid.get_node_ids(), 0.0
    )
    record = secure_aggregated_round(request)
    assert record["aggregated"] and record["replies"] == 2 and record["sent"] == 3
    std = float(model.w.detach().std())
    assert std == pytest.approx(2.0 * 0.5 / 2, rel=0.03)  # z * C / replies
    assert strategy.accountant.num_releases == 1  # the release is accounted (it was skipped)
    assert 0 < strategy.accountant.get_privacy_spent().epsilon < math.inf
