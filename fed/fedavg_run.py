"""Flower's own FedAvg over the sites, then one explicit evaluate message per site.

The downstream classifier and the federated reference models both train this way: rounds by
``FedAvg.start`` (weighted by cases), then the final global weights go to every site once so
each site's own evaluation comes back (not just their average, which is all
``FedAvg``'s evaluate round would return).
"""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from synthct.config import SynthctConfig
from synthct.fed.errors import FederatedError

__all__ = ["fedavg_then_evaluate"]


def fedavg_then_evaluate(
    grid: Grid,
    nodes: list[int],
    config: SynthctConfig,
    *,
    initial: ArrayRecord,
    rounds: int,
    train_config: ConfigRecord,
    what: str,
) -> tuple[Result, list[RecordDict]]:
    """``rounds`` of FedAvg from ``initial``, then every node evaluates the final weights;
    returns Flower's result and each site's reply content. A site error stops with a
    :class:`FederatedError` naming ``what`` was being evaluated."""
    strategy = FedAvg(
        fraction_evaluate=0.0,
        min_train_nodes=config.federated.min_sites,
        min_available_nodes=min(len(nodes), len(config.site_names)),
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=rounds,
        timeout=config.federated.round_timeout_s,
        train_config=train_config,
    )
    messages = [
        Message(
            content=RecordDict({"arrays": result.arrays, "config": train_config}),
            message_type=MessageType.EVALUATE,
            dst_node_id=node,
        )
        for node in nodes
    ]
    contents = []
    for reply in grid.send_and_receive(messages, timeout=config.federated.round_timeout_s):
        if reply.has_error():
            raise FederatedError(f"{what} evaluation failed at a site: {reply.error.reason}")
        contents.append(reply.content)
    if not contents:
        raise FederatedError(f"no site returned its {what} evaluation")
    return result, contents
