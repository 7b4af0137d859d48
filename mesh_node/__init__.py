"""mesh_node: runs LLM tasks from a Redis stream against the Anthropic Messages API."""

__version__ = "0.1.0"
