"""Sensitivity analysis: controlled transformations swept against a model's output (misas)."""
