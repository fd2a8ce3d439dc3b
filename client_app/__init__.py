"""Flower ClientApp of pmafl."""
