"""Figures comparing optimizer runs and sweeps (matplotlib, Agg backend)."""

from .figures import Band, Curves, check_figure_path, comparison_figure, figure_title, tell_apart
from .sweeps import Series, batch_figure, lr_figure

__all__ = ["Band", "Curves", "Series", "batch_figure", "check_figure_path", "comparison_figure", "figure_title",
           "lr_figure", "tell_apart"]
