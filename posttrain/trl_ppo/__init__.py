"""PPO post-training (RLHF) for Megatron-core models.

The formulas live in :mod:`posttrain.trl_ppo.core_algos`, which depends on torch only.
"""
