"""Network modules: the SFAE feature extractor and autoencoder, and the baselines."""
