"""medjdt.data."""
