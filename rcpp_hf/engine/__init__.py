"""The machinery every method shares: recorded attention rows, the KV cache that knows its visual entries and can
drop them, and prefill pruning."""
