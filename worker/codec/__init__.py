"""Latent codes: the byte format of a code, entropy coding, the coder processes, the batch
container."""
