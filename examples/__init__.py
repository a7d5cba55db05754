"""Runnable examples: `svantic agent examples.demo_agent:agent` imports them from the
repository root (a regular package, so no other `examples` on the path can shadow it)."""
