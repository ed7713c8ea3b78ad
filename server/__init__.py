"""What runs the server: its configuration, the TorchServe launcher, the worker plan and the helpers
(health checks, key renewal, scaling) that run beside it."""
