"""difflora: hypernet."""
