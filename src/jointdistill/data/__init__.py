"""Datasets: sources (synthetic, real adapters), validation, splitting and the prepared-data reader."""
