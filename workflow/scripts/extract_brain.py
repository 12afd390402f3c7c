"""Skull-strip one scan or take its non-zero voxels (rule extract_brain)."""

from sfae.logs import rule_logging
from sfae.preprocessing.brain_extraction import extract_brain

with rule_logging(snakemake):
    settings = snakemake.params.settings
    extract_brain(
        snakemake.input.image,
        snakemake.output.brain,
        snakemake.output.mask,
        snakemake.output.report,
        method=snakemake.params.method,
        seed=settings["seed"],
        min_volume_ml=settings["min_brain_volume_ml"],
        max_volume_ml=settings["max_brain_volume_ml"],
        timeout_s=settings["timeout_s"],
    )
