"""Figures comparing optimizer runs (matplotlib, Agg backend)."""

from .figures import Band, Curves, comparison_figure, figure_title

__all__ = ["Band", "Curves", "comparison_figure", "figure_title"]
