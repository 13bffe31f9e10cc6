"""Model servers bundled with modelctl."""
