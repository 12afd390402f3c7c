"""sfae: reproducible benchmark of unsupervised anomaly localization in brain MRI.

Demo (default config):  snakemake --cores all
Published protocol:     snakemake --profile slurm --configfile config/paper.yaml --config data_root=/data
"""

from snakemake.utils import min_version

min_version("9.0")


# The demo configuration is the default. A --configfile given on the command
# line replaces it instead of being merged into it, so the paper configuration
# never inherits the demo data set.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/preprocess.smk"
include: "rules/methods.smk"


rule all:
    """Preprocess the data sets, train and evaluate every method for every seed, and write each experiment's report."""
    default_target: True
    input:
        all_targets(),


rule preprocess:
    """Only preprocess: the training and evaluation splits of every experiment and the registration QC tables."""
    input:
        preprocessing_targets(),
