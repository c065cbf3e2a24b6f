"""Offline work on the paper's trace formats: replay, scoring, plots."""
