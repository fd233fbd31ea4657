"""Procedural phantoms with ground truth: knee radiographs (KL grade) and H&E histology tiles."""

from cfexplain.data.phantoms.histology import HistologyPhantom
from cfexplain.data.phantoms.knee import KneePhantom, kl_grade

__all__ = ["HistologyPhantom", "KneePhantom", "kl_grade"]
