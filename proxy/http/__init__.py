"""The proxy's HTTP servers: the lean front, aiohttp's app, handlers and routes."""
