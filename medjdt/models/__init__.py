"""medjdt.models."""
