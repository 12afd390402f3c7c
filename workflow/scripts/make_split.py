"""Concatenate the slice files of one split into one array file (rule make_split)."""

from sfae.logs import rule_logging
from sfae.splits import concatenate_slice_files

with rule_logging(snakemake):
    concatenate_slice_files(list(snakemake.input.slices), snakemake.output.split)
