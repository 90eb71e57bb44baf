"""gRPC service: servicer, dynamic batching, job API, health, metrics, client, CLI."""
