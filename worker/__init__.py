"""Runtime side: model repository, onnxruntime engine, latent-code codec, job consumer.

Never imports torch, ``latentserve.export`` or ``latentserve.service``.
"""
