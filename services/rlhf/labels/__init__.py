"""Human feedback: the Arena-style labelling web app (`rlhf serve labels`), its votes stream,
and the Bradley–Terry / Elo leaderboard of model versions fitted from the votes."""
