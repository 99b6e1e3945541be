"""Kubernetes runtime: the CRD state store, copy Jobs, Events, leader election.

The only package that imports the official ``kubernetes`` client."""
