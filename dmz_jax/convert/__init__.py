"""Weight converters from other frameworks' checkpoints (numpy only, no torch)."""
