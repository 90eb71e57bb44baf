"""Shared fixtures. Each area keeps its fixtures in its own plugin module here."""

pytest_plugins = ["fixtures_models", "fixtures_redis", "fixtures_cluster"]
