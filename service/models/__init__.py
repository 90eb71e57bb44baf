"""The served models: the catalog and each version's lifecycle, per-model settings, the
ModelControl API."""
