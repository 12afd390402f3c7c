"""Collect the registration reports of a data set into one CSV table (rule registration_qc)."""

from sfae.logs import rule_logging
from sfae.preprocessing.reports import write_registration_table

with rule_logging(snakemake):
    write_registration_table(list(snakemake.input.reports), snakemake.output.table)
