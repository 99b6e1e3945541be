"""Pure data: the seed's four tables (virtual volumes, physical volumes,
mapping, pairs) as frozen dataclasses.  No I/O anywhere below this package."""
