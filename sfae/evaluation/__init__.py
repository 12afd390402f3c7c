"""Evaluation of anomaly maps: exact pixel-level and image-level metrics of the benchmark protocol."""
