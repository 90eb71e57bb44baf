"""The CLI commands of the service side: serve/compress/reconstruct/sample/demo, job, models, token."""
