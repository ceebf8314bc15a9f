"""Data source adapters. Importing this package registers every adapter with `registry`; `make_source` picks
the one ``prepare.dataset`` names. To add one, see docs/data.md."""

from jointdistill.data.sources import cityscapes, folder, nyuv2, synthetic  # noqa: F401  (each registers itself)
from jointdistill.data.sources.registry import make_source, register

__all__ = ["make_source", "register"]
