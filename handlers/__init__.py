"""Serving: the TorchServe handler, server control for tests and tools, and the gRPC client."""
