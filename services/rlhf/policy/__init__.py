"""Policy generation: the servicer, the request layer and the engines behind it."""
