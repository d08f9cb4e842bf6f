"""One proxied call, step by step: authenticate, read, route, admit, forward, settle."""
