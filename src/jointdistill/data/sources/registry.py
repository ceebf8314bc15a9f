"""Data sources by name: each adapter registers its factory with `register`, and `make_source` picks the one
``prepare.dataset`` names. This module imports no adapter; importing the package `jointdistill.data.sources`
imports them all.
"""

from __future__ import annotations

from collections.abc import Callable

from jointdistill.config import PrepareParams
from jointdistill.data.sample import Source
from jointdistill.errors import ConfigError

_REGISTRY: dict[str, Callable[[PrepareParams, int], Source]] = {}


def register(name: str):
    def deco(factory):
        _REGISTRY[name] = factory
        return factory

    return deco


def make_source(params: PrepareParams, seed: int) -> Source:
    factory = _REGISTRY.get(params.dataset)
    if factory is None:
        available = ", ".join(sorted(_REGISTRY))
        raise ConfigError(
            f"prepare.dataset: the '{params.dataset}' adapter is not available in this version (available: {available})"
        )
    if params.dataset != "synthetic" and not params.root:
        raise ConfigError(
            f"prepare.root is required for dataset '{params.dataset}' (the folder or file to read; "
            "in a Kubeflow run, pin one with data_repo/data_rev/data_path instead)"
        )
    return factory(params, seed)
