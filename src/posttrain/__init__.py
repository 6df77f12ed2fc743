"""posttrain: SFT, reward modelling, PPO, DPO and online DPO for language models."""

__version__ = "0.1.0"
