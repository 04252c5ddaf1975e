"""Packaged models (aliases) and corpora, built once into ``SURESERVE_HOME``."""

from sureserve.zoo.registry import DEFAULT_MODEL, ZOO, ZooEntry

__all__ = ["DEFAULT_MODEL", "ZOO", "ZooEntry"]
