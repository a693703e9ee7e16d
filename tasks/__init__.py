"""One module per step of the sweep: plain functions, with thin Prefect `@task` wrappers on top."""
