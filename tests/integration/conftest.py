from harness.fixtures import plugin  # noqa: F401  (a real plugin on a unix socket)
