"""The llama-gguf-inference gateway: an authenticating HTTP/1.1 proxy for llama-server."""
