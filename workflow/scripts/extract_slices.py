"""Equalize one registered volume inside its brain mask and keep the configured axial slices (rule extract_slices)."""

from sfae.logs import rule_logging
from sfae.preprocessing.slices import slice_volume

with rule_logging(snakemake):
    settings = snakemake.params.settings
    slice_volume(
        snakemake.input.image,
        snakemake.input.mask,
        snakemake.input.labels,
        snakemake.output.slices,
        subject=snakemake.wildcards.subject,
        start=settings["start"],
        stop=settings["stop"],
        size=settings["size"],
    )
