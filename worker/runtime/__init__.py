"""The runtime core: model repository and manifest, the onnxruntime engine, the pipeline
(images <-> codes), image I/O, quality, model checks."""
