# SHIM: removed at integration
"""Moved to :mod:`bnfold.api`."""

from .api import Progress, fold_path

__all__ = ["Progress", "fold_path"]
