"""medjdt.labels."""
