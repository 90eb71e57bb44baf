"""The PyTorch networks: AE / VAE / VQ-VAE, quantizer, priors, entropy models, the classifier."""
