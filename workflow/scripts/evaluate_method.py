"""Compute the anomaly maps and metrics of one trained run (rule evaluate_method)."""

import torch

from sfae.evaluation.evaluate import evaluate_files
from sfae.logs import rule_logging
from sfae.training import load_trained_method, resolve_device

with rule_logging(snakemake):
    torch.set_num_threads(snakemake.threads)
    evaluation = snakemake.params.evaluation
    device = resolve_device(snakemake.params.device)
    method = load_trained_method(snakemake.input.model, device=snakemake.params.device)
    evaluate_files(
        method,
        snakemake.input.val,
        snakemake.input.test,
        snakemake.output.metrics,
        snakemake.output.examples,
        experiment=snakemake.wildcards.experiment,
        method_name=snakemake.wildcards.method,
        seed=int(snakemake.wildcards.seed),
        data_note=snakemake.params.data_note,
        max_fpr=evaluation["max_fpr"],
        top_fraction=evaluation["top_fraction"],
        batch_size=evaluation["batch_size"],
        device=device,
        examples=evaluation["examples"],
    )
