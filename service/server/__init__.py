"""The gRPC server: assembly, the Inference servicer, batching, errors to statuses, auth,
health, reflection, metrics, logs, tracing."""
