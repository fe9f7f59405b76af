"""Model files: the store (versioned HF dirs + manifest), the registry, safe loading, tiny models."""
