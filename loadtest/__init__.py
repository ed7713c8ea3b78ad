"""Load testing of the running TorchServe deployment with Locust."""
