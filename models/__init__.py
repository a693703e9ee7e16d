"""Network definitions, weight serialisation and the model registry (no Prefect in here)."""
