"""Reference log-probs: the ReferenceService servicer and the frozen model behind it."""
