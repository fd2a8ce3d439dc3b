"""What a wrapper strategy (`FedFTG`) reads from the strategy it wraps, beyond Flower's
`Strategy` methods. `ScreenedFedAvg`, and so `PMAFL`, provides it; a plain Flower strategy such as
`FedAvg` does not, and a wrapper then falls back on what Flower's API alone gives."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from flwr.app import ArrayRecord, Message


@runtime_checkable
class WrappedStrategy(Protocol):
    """The contract between a wrapper and the strategy it wraps.

    Attributes
    ----------
    weighted_by_key : str
        The reply metric holding a reply's claimed examples (`num-examples`).
    aggregated : list[tuple[Message, ArrayRecord, float]]
        The train replies the last `aggregate_train` averaged, each with its model as it entered
        the aggregate (parsed, and clipped when the strategy clips) and its weight there (its
        claim, capped when the strategy caps). Empty when the round had too few valid replies.
    """

    weighted_by_key: str
    aggregated: list[tuple[Message, ArrayRecord, float]]

    def set_num_rounds(self, num_rounds: int) -> None:
        """Called by the wrapper's `start` before the first round: the run's last round."""

    def round_summary(self, server_round: int) -> dict[str, Any]:
        """The strategy's figures of a round (`RoundLoop.round_summary`): its `failures` and
        whatever else it reports; the wrapper adds its own."""
