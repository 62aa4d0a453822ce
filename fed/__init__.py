"""Flower apps (installed as ``synthct.fed``)."""
