"""Reward-model training (``pretrain_gpt.py --stage rm``): pairwise ranking loss on preference pairs.

* :mod:`posttrain.rm.loss`: the loss and its metrics, pure torch.
* :mod:`posttrain.rm.data`: length policy, skip counting and batching of the preprocessed pairs.
* :mod:`posttrain.rm.trainer`: the stage (flags, training loop, evaluation, checkpoints); see its docstring for
  the checkpoint layout and docs/reward_model.md for the guide.
"""
