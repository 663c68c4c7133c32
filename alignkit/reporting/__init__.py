"""Reporting: the terminal summary, plots, and the self-contained HTML report."""
