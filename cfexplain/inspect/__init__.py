"""Model structure of a trained classifier: filters, feature maps, embeddings, class maximisation, units.

``python -m cfexplain.inspect run=runs/<name> what=[filters,feature_maps,embeddings,class_max,units]``
is the entry point (``__main__.py``). The maths lives in ``structure``, ``embeddings``,
``class_max`` and ``units`` (pure functions on tensors); ``page`` draws the HTML. Importing this
package imports nothing heavy.
"""
