"""PM-AFL strategy: a screened FedAvg (`ScreenedFedAvg`: no node can crash or take over the
run) that broadcasts PM-AFL's local-training hyperparameters and expects exactly the metrics its
local training returns."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from pmafl.compression import decode_update
from pmafl.config import TrainConfig
from pmafl.evaluate import SCORES
from pmafl.protocol import GLOBAL_LOSS
from pmafl.train import train_metric_names, warmup_eps
from strategies.aggregation import fair_weights
from strategies.screened_fedavg import ScreenedFedAvg
from strategies.screening import BadReply


class PMAFL(ScreenedFedAvg):
    """Pre-trained Model guided Adversarial Federated Learning, server side.

    Each round it sends the global model and the local-training hyperparameters (`train_config`,
    eps ramped during the warm-up, merged under any `train_config` given to `start`) to the
    sampled nodes, screens the replies and averages the valid ones (`ScreenedFedAvg`). Safe by
    default: one hostile node of ten can neither crash the run nor take over the model.

    Screening holds a reply to PM-AFL's protocol: a train reply's metrics must be exactly
    `train_metric_keys`, the keys `pmafl.train.train_model` returns for `train_config`
    (`pmafl.train.train_metric_names`), and an evaluate reply's exactly `evaluate_metric_keys`,
    `pmafl.evaluate.SCORES` and `num-examples`. Federated evaluation messages carry the train
    config too: its eps is the attack radius.

    With `train_config.fair_q` > 0 (q-FFL), each train reply also carries `global-loss` and its
    weight in the mean (of the models and of the train metrics) is scaled by
    `strategies.aggregation.fair_weights`, bounded by `weight_cap`; it needs aggregation "mean"
    and weight_cap > 0.

    With `train_config.update_compression` other than `none`, clients reply with a compressed
    update (`pmafl.compression`) that is decoded against the global model sent before it is
    screened; one that cannot be decoded is left out like any malformed reply.

    Parameters
    ----------
    train_config : TrainConfig (default: TrainConfig())
        Local-training hyperparameters broadcast in every train message (objective, alpha,
        lambda-alg, tau, mixup-alpha, eps, PGD steps, optimiser settings, ...).
    evaluate_every : int (default: 1)
        Federated evaluation every this many rounds and in the last round; 0 turns it off
        (`ScreenedFedAvg`).
    eps_warmup_rounds : int (default: 0)
        Ramp the training radius: round r trains at eps * min(1, r / eps_warmup_rounds); 0
        trains at the full eps from round 1.
    **kwargs
        `ScreenedFedAvg`'s screening and robustness settings, documented there: aggregation
        ("mean"), trim_fraction (0.2), clip_factor (2.0), weight_cap (1.0), node_wait_timeout
        (3600), max_idle_rounds (3), max_missed_rounds (2), skip_rounds (3); and Flower's
        `FedAvg` settings: fraction_train (1.0), fraction_evaluate (1.0), min_train_nodes (2),
        min_evaluate_nodes (2), min_available_nodes (2), weighted_by_key ("num-examples"),
        arrayrecord_key ("arrays"), configrecord_key ("config").
    """

    def __init__(self, train_config: TrainConfig | None = None, evaluate_every: int = 1,
                 eps_warmup_rounds: int = 0, **kwargs: Any) -> None:
        super().__init__(evaluate_every=evaluate_every, **kwargs)
        self.train_config = train_config or TrainConfig()
        if self.train_config.fair_q > 0 and (self.aggregation != "mean" or self.weight_cap <= 0):
            raise ValueError(f"fair_q > 0 (q-FFL) weights the mean and is bounded by weight_cap: it "
                             f"needs aggregation 'mean' and weight_cap > 0, got "
                             f"{self.aggregation!r} and {self.weight_cap!r}")
        self.eps_warmup_rounds = eps_warmup_rounds
        self.train_metric_keys = train_metric_names(self.train_config)
        self.evaluate_metric_keys = frozenset({*SCORES, self.weighted_by_key})
        self._sent_torch: dict[str, Any] | None = None

    def summary(self) -> None:
        """Log the local-training hyperparameters, then the aggregation and sampling settings."""
        log(INFO, "\t├──> PM-AFL local training (broadcast each round):")
        for key, value in self.train_config.to_record().items():
            log(INFO, "\t│\t├── %s: %s", key, value)
        super().summary()

    def round_eps(self, server_round: int) -> float:
        """The training radius of a round, after the warm-up ramp."""
        return warmup_eps(self.train_config.eps, self.eps_warmup_rounds, server_round)

    def round_summary(self, server_round: int) -> dict[str, Any]:
        """`ScreenedFedAvg.round_summary` plus `train-eps`, the round's training radius (0 for
        round 0, before training)."""
        summary = super().round_summary(server_round)
        summary["train-eps"] = self.round_eps(server_round) if server_round else 0.0
        return summary

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample nodes; send them the global model and the local-training hyperparameters (eps
        ramped during the warm-up)."""
        config = ConfigRecord({**self.train_config.to_record(), "eps": self.round_eps(server_round),
                               **config})
        self._sent_torch = None
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Sample nodes for federated evaluation (every `evaluate_every` rounds and the last one);
        send them the global model and the train config (its eps is the attack radius)."""
        config = ConfigRecord({**self.train_config.to_record(), **config})
        return super().configure_evaluate(server_round, arrays, config, grid)

    def train_weights(self, server_round: int, contents: list[RecordDict]) -> list[float]:
        """`ScreenedFedAvg`'s capped weights, reweighted by q-FFL (`fair_weights`) with `fair-q`
        > 0; logged. Federated evaluation keeps the capped weights."""
        weights = super().train_weights(server_round, contents)
        q = self.train_config.fair_q
        if q <= 0:
            return weights
        losses = [next(iter(c.metric_records.values()))[GLOBAL_LOSS] for c in contents]
        fair = fair_weights(weights, losses, q, self.weight_cap)
        log(INFO, "round %d: q-FFL (q=%g) weights %s from global losses %s", server_round, q,
            [round(w, 1) for w in fair], [round(loss, 3) for loss in losses])
        return fair

    def decode_train_reply(self, content: RecordDict) -> RecordDict:
        """With `update-compression`, the reply with its encoded update replaced by the model it
        stands for (`pmafl.compression.decode_update` against the global model sent); raises
        `BadReply` when it cannot be decoded."""
        method = self.train_config.update_compression
        if method == "none" or len(content.array_records) != 1:
            return content
        (key, record), = content.array_records.items()
        if self._sent_torch is None:
            self._sent_torch = self._sent_global.to_torch_state_dict()
        try:
            model = decode_update(record.to_torch_state_dict(), self._sent_torch, method)
        except ValueError as e:
            raise BadReply(str(e)) from None
        decoded = RecordDict({name: value for name, value in content.items()})
        decoded[key] = ArrayRecord(torch_state_dict=model)
        return decoded
