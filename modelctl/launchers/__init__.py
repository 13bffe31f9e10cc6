"""Small programs modelctl runs in a server's own environment (never imported by modelctl itself)."""
