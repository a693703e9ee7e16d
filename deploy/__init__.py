"""Deployment helpers: the Docker image's pins, the GPU work pool's template, prebuilt-image deploys."""
