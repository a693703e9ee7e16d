"""The Prefect layer: the `lr-sweep` flow, its config and its command line."""
