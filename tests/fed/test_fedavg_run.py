"""The classifiers' FedAvg sets aside a NaN or outsized update and averages the rest."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from synthct.fed.fedavg_run import _ScreenedFedAvg


def _reply(node: int, state: dict[str, torch.Tensor], cases: int) -> Message:
    content = RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": cases})}
    )
    message = Message(content, dst_node_id=1, message_type="train")
    message.metadata.__dict__["_src_node_id"] = node  # as a SuperNode's reply carries it
    return message


def test_a_nan_and_an_outsized_update_are_set_aside_and_the_rest_averaged(server_identity):
    start = {"w": torch.zeros(4)}
    strategy = _ScreenedFedAvg(norm_ratio=10.0, min_train_nodes=2, fraction_evaluate=0.0)
    strategy._sent = start  # what configure_train sent this round
    honest = [
        _reply(100, {"w": torch.full((4,), 0.1)}, 10),
        _reply(101, {"w": torch.full((4,), 0.4)}, 30),
    ]
    hostile = _reply(102, {"w": torch.full((4,), 1e4)}, 1000)  # norm far above the others
    broken = _reply(103, {"w": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, 20)
    arrays, _ = strategy.aggregate_train(1, [*honest, hostile, broken])
    expected = (0.1 * 10 + 0.4 * 30) / 40  # the honest sites' case-weighted mean only
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], torch.full((4,), expected))
    # with only one update left the round is not aggregated
    alone, _ = strategy.aggregate_train(2, [honest[0], hostile, broken])
    assert alone is None
