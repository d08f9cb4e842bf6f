"""What operators see: Prometheus series, their in-process tally, the access log."""
