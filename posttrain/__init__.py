"""posttrain: Megatron-core based RLHF post-training (PPO with actor, reference, critic and reward models)."""

__version__ = "0.1.0"
