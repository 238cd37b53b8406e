"""difflora: service."""
