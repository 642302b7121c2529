"""Figures comparing optimizer runs (matplotlib, Agg backend)."""

from .figures import STYLES, Run, comparison_figure, figure_title, load_run

__all__ = ["STYLES", "Run", "comparison_figure", "figure_title", "load_run"]
