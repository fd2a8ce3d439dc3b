"""The message protocol between the server and the clients: every key a message or a reply
carries that this project defines, in one place. The strategies, the ClientApp and the core's
training function all read their keys from here.

A train message holds the global model under `ARRAYS` and the local-training hyperparameters
(`pmafl.config.TrainConfig.to_record`) plus `SERVER_ROUND` under `CONFIG`; its reply holds the
trained model (or its compressed update) under `ARRAYS` and the loss terms, `NUM_EXAMPLES` and
the timing keys under `METRICS`. An evaluate message holds the same; its reply only `METRICS`.
"""

# The records of a message's content (Flower's `FedAvg` defaults for the first two).
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Config: the round a message belongs to (seeds the client's local training).
SERVER_ROUND = "server-round"
# Reply metric: the examples a client trained or evaluated on, its weight in the mean.
NUM_EXAMPLES = "num-examples"
# Config flag asking for the client's label counts (FedFTG), and the reply metric holding them.
LABEL_COUNTS = "label-counts"
# Reply metric with `fair-q` > 0: q-FFL's F_k, the node's mean adversarial cross-entropy of the
# global model it received, on its training data (`pmafl.train.global_loss`).
GLOBAL_LOSS = "global-loss"
# Reply metric: the seconds of the local training or evaluation itself; the round loop keeps the
# slowest and takes it out of the metrics, which must not depend on load.
COMPUTE_SECONDS = "compute-seconds"
# Reply metric of a fresh process's first reply: the seconds from that process's start to the
# start of its compute (interpreter, imports, loading data and teacher).
STARTUP_SECONDS = "startup-seconds"
# The reply metrics the round loop takes out before a strategy screens the rest.
TIMING_METRICS = frozenset({COMPUTE_SECONDS, STARTUP_SECONDS})
