"""Flower ServerApp of pmafl."""
