"""Server-side strategies (Flower Message API). `PMAFL` is the one to plug into a ServerApp."""

from strategies.pmafl import PMAFL

__all__ = ["PMAFL"]
