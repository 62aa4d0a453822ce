"""Configs shipped with synthct (installed as ``synthct.configs``): demo, smoke."""
