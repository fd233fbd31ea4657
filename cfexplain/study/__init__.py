"""Reader studies: pages that ask readers whether images are real and whether counterfactuals
convince (``build``, ``page``), and their scoring (``score``)."""
