"""Explanations of a trained run: counterfactual sequences, attribution maps, metrics, galleries.

``python -m cfexplain.explain run=runs/<name>`` is the entry point (``__main__.py``): a package
and a module cannot share the name ``cfexplain.explain``, so the command lives in the package.
Importing this package imports nothing heavy.
"""
