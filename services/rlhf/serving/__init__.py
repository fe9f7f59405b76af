"""gRPC plumbing shared by every service: server bootstrap, health, reflection, interceptors,
metrics endpoint, graceful shutdown, micro-batching."""
