"""PyTorch side: models, training, ONNX export and the model repository writer.

Needs the ``export`` extra (torch, onnx). Nothing else in latentserve imports it.
"""
