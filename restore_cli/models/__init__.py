"""Model architectures, the registry, and weight loading."""
