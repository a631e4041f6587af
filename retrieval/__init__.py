"""gRPC retrieval service."""
