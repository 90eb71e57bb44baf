"""Python clients of the gRPC API (inference and jobs), their channel, security settings and retries."""
