"""medjdt.metrics."""
