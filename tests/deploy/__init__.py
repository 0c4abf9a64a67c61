"""Tests of the container image definition and the deployment manifests."""
