"""Test and demo helpers that are not part of the migration engine (fault injection)."""
