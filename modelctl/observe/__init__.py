"""What modelctl shows of its servers: status rows and Prometheus metrics."""
