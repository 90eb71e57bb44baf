"""latentserve: serve autoencoder-family image models as compact latent codes.

Subpackages map to the repository's top-level folders:
``latentserve.export`` (export/), ``latentserve.worker`` (worker/),
``latentserve.service`` (service/), ``latentserve.v1`` (stubs generated from proto/).
"""

__version__ = "0.1.0"
