"""Model loading and the per-family site table."""
