"""cfexplain: counterfactual explanations of medical-image classifiers.

Importing the package is cheap: no wandb, no GPU, no compilation. The entry points are
``python -m cfexplain.train`` and ``python -m cfexplain.explain``.
"""

__version__ = "0.1.0"
