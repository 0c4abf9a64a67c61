"""Tests of the contract (schemas/) and of its generated documentation (docs/schemas, docs/asyncapi.yaml)."""
