"""Evaluation on ground truth: which explanations tell the truth (``python -m cfexplain.evaluate``)."""
