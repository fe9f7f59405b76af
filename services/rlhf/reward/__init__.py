"""Reward scoring: the RewardService servicer and the scorer behind it (Bradley–Terry rewards)."""
