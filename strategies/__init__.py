"""Server-side strategies (Flower Message API). `PMAFL` is the one to plug into a ServerApp;
`FedFTG` wraps it (or any Flower strategy) with server-side data-free fine-tuning."""

from strategies.fedftg import FedFTG
from strategies.pmafl import PMAFL

__all__ = ["FedFTG", "PMAFL"]
