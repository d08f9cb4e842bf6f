"""An OpenAI-compatible routing proxy for LLM providers and local engines."""
