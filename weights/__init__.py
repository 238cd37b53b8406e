"""difflora: weights."""
