"""Evaluation: metrics (confusion matrix, depth meters), scoring a model on a split and Δm, the report and
its figures and pictures."""
