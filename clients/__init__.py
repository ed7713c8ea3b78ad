"""Clients of a running TorchServe: its expiring keys, the management API and the gRPC services."""
