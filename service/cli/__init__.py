"""The service side's commands: serve, compress, reconstruct, sample, demo, job, models, token."""
