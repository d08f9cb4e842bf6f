"""The proxy's Redis client: RESP on the wire, pipelining, script batching, subscriptions."""
