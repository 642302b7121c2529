"""Figures comparing optimizer runs and sweeps (matplotlib, Agg backend)."""

from .figures import Band, Curves, comparison_figure, figure_title
from .sweeps import Series, batch_figure, lr_figure

__all__ = ["Band", "Curves", "Series", "batch_figure", "comparison_figure", "figure_title", "lr_figure"]
