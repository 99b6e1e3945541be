"""Array drivers.  Each declares what it can do as small protocols the core probes."""
