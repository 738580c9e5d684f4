"""Runs of the pipeline: one track end to end, batches, provenance records, regenerate, list, locks, doctor."""
