"""State stores: where the four tables live (SQLite embedded, CRDs on Kubernetes)."""
