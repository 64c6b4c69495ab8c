"""Figures about a model: metrics, fairness groups, the report and its plots."""
