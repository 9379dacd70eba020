"""medjdt.losses."""
