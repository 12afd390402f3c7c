"""sfae: reproducible benchmark of unsupervised anomaly localization in brain MRI.

The Structural Feature-Autoencoder (SFAE), its baselines and the evaluation
protocol, orchestrated by the Snakemake workflow at the repository root.
"""

__version__ = "0.1.0"
