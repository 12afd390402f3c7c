"""Register one brain to the atlas and resample its mask and labels (rule register)."""

from sfae.logs import rule_logging
from sfae.preprocessing.registration import RegistrationSettings, register_volume

with rule_logging(snakemake):
    settings = snakemake.params.settings
    register_volume(
        snakemake.input.brain,
        snakemake.input.mask,
        snakemake.input.get("segmentation"),
        snakemake.input.atlas,
        image_out=snakemake.output.image,
        mask_out=snakemake.output.mask,
        labels_out=snakemake.output.labels,
        transform_out=snakemake.output.transform,
        report_out=snakemake.output.report,
        qc_out=snakemake.output.qc,
        settings=RegistrationSettings(
            seed=settings["seed"],
            min_dice=settings["min_dice"],
            histogram_bins=settings["histogram_bins"],
            sampling_fraction=settings["sampling_fraction"],
            shrink_factors=tuple(settings["shrink_factors"]),
            smoothing_sigmas_mm=tuple(settings["smoothing_sigmas_mm"]),
            iterations=settings["iterations"],
        ),
        already_registered=snakemake.params.registered,
        threads=snakemake.threads,
        subject=snakemake.wildcards.subject,
    )
