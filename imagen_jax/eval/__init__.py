"""Alignment metrics for the built-in datasets and prompt suites."""
