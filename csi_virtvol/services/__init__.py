"""Use cases, transport-agnostic.  Idempotency and crash recovery live here."""
