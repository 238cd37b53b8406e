"""difflora: pipeline_data."""
