"""Model families, one file each: classifier, stylegan2, encoder, normative."""
