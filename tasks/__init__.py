"""The steps of the ragbatch pipelines: plain typed functions and classes, usable without Prefect."""
