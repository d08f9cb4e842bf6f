"""The HTTP/1.1 client for upstream calls: pools, responses, transport errors."""
