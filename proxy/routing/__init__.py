"""Which endpoint a call tries next: balancing, circuit breaking, backoff."""
