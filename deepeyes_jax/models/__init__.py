"""Model ports."""
