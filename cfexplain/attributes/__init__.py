"""``python -m cfexplain.attributes``: StyleSpace attributes of a trained run (AttFind)."""
