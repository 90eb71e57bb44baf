"""Turning trained networks into repository versions: the zoo exporter, user models, ONNX
import, contract checks, tables."""
