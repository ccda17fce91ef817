"""Evaluation: NLU classification metrics and their reports."""
