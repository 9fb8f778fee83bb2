"""End-to-end pipelines built from the public commands (the demo)."""
