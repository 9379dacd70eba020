"""medjdt.reporting."""
