"""Per-volume preprocessing: brain extraction, registration, intensity normalization and slicing."""
