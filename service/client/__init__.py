"""Python clients of the gRPC API (inference and jobs): channel, settings, retries."""
