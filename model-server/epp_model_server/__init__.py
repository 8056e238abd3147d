"""A vLLM-compatible prefix-caching model server for CPU."""
