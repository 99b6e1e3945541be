"""Copying virtual volumes: which method moves which bytes (planner), and the
host copy engine a copy pod runs (engine, cli)."""
