"""Server-side strategies (Flower Message API). `PMAFL` is the one to plug into a ServerApp;
`FedFTG` wraps it (or any Flower strategy) with server-side data-free fine-tuning; either stops a
run that cannot progress with `FederationStalled`.

One module per concept: `round_loop` (the loop both strategies run), `screening` (whether a reply
is fit to average), `aggregation` (how the fit replies are averaged), `screened_fedavg` (FedAvg
with screening and bounded weights, `PMAFL`'s base), `wrapped` (what a wrapper needs from the
strategy it wraps), `pmafl` and `fedftg`."""

from strategies.fedftg import FedFTG
from strategies.pmafl import PMAFL
from strategies.screened_fedavg import FederationStalled

__all__ = ["FedFTG", "FederationStalled", "PMAFL"]
