"""Local engines: OpenAI-compatible servers that the proxy starts, watches and stops."""
