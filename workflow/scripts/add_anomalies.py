"""Add synthetic sink or source deformations to one split (rule add_anomalies)."""

from sfae.anomalies import add_anomalies_file
from sfae.logs import rule_logging

with rule_logging(snakemake):
    settings = snakemake.params.settings
    add_anomalies_file(
        snakemake.input.split,
        snakemake.output.anomalies,
        kind=settings["kind"],
        fraction=settings["fraction"],
        radius_px=tuple(settings["radius_px"]),
        seed=snakemake.params.seed,
    )
