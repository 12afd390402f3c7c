"""Tabulate, test and plot every method of one experiment over the seeds (rule aggregate_experiment)."""

from pathlib import Path

from sfae.evaluation.aggregate import aggregate_experiment
from sfae.logs import rule_logging

with rule_logging(snakemake):
    evaluation = snakemake.params.evaluation
    aggregate_experiment(
        list(snakemake.input.metrics),
        list(snakemake.input.examples),
        experiment=snakemake.wildcards.experiment,
        reference_method=evaluation["reference_method"],
        alpha=evaluation["alpha"],
        t_tests=evaluation["t_tests"],
        output_dir=Path(snakemake.params.output_dir),
        method_order=list(snakemake.params.methods),
    )
