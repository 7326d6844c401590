"""Serve application builder and configs (installed as `retroinfer.deployments`)."""
