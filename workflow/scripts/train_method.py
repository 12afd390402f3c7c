"""Train one method with one seed (rule train_method)."""

from sfae.logs import rule_logging
from sfae.training import TrainingSettings, train_method

with rule_logging(snakemake):
    training = snakemake.params.training
    train_method(
        snakemake.input.split,
        method_name=snakemake.wildcards.method,
        method_settings=snakemake.params.settings,
        seed=int(snakemake.wildcards.seed),
        settings=TrainingSettings(
            steps=training["steps"],
            batch_size=training["batch_size"],
            learning_rate=training["learning_rate"],
            checkpoint_every=training["checkpoint_every"],
            device=training["device"],
            threads=snakemake.threads,
        ),
        model_out=snakemake.output.model,
        report_out=snakemake.output.report,
        loss_csv_out=snakemake.output.loss_csv,
        loss_png_out=snakemake.output.loss_png,
        checkpoint_path=snakemake.params.checkpoint,
    )
