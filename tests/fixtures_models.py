"""Model fixtures: ``tiny_repo`` (tiny trained models exported to ONNX) and ``mnist_images``.

Owned by the export work (issue 3).
"""
