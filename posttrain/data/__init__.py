"""Data for post-training: offline preprocessing into Megatron indexed datasets, and the training-side readers.

* :mod:`posttrain.data.preprocess`: ``preprocess_data.py`` (rows -> templated, tokenized indexed datasets).
* :mod:`posttrain.data.templates`: the ``--prompt-type`` registry.
* :mod:`posttrain.data.handlers`: the ``--handler-name`` registry.
* :mod:`posttrain.data.prompt_dataset`: :class:`PromptDataset`, :class:`PairwiseDataset`, :class:`PromptSampler`.
"""
from posttrain.data.errors import DataError
from posttrain.data.handlers import get_handler, handler_names, register_handler
from posttrain.data.prompt_dataset import (
                                           PairwiseDataset,
                                           PreferencePair,
                                           PromptDataset,
                                           PromptSampler,
                                           pad_sequences,
)
from posttrain.data.templates import get_template, register_template, template_names

__all__ = [
    "DataError", "PairwiseDataset", "PreferencePair", "PromptDataset", "PromptSampler", "get_handler",
    "get_template", "handler_names", "pad_sequences", "register_handler", "register_template", "template_names",
]
