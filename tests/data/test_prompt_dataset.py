"""Training-side readers and the data-parallel prompt sampler, on datasets preprocessed from the real data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from posttrain.data import PairwiseDataset, PromptDataset, PromptSampler, pad_sequences
from posttrain.data.preprocess import PreprocessConfig, run_preprocess

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def qwen_text(prompt: str) -> str:
    return ("<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n<|im_start|>user\n" + prompt
            + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tok(example_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(example_model_dir))


@pytest.fixture(scope="module")
def prompts_prefix(tmp_path_factory, shared_data, example_model_dir) -> Path:
    prefix = tmp_path_factory.mktemp("prompts") / "alpaca"
    run_preprocess(PreprocessConfig(input=str(shared_data / "alpaca_en_800.parquet"), output_prefix=str(prefix),
                                    tokenizer_name_or_path=str(example_model_dir), prompt_type="qwen"))
    return prefix


@pytest.fixture(scope="module")
def alpaca_prompts(shared_data) -> list[str]:
    rows = pq.read_table(shared_data / "alpaca_en_800.parquet").to_pylist()
    return [r["instruction"] + ("\n" + r["input"] if r["input"] else "") for r in rows]


def test_prompt_dataset_items_are_the_templated_prompts(prompts_prefix, tok, alpaca_prompts):
    dataset = PromptDataset(prompts_prefix)
    expected = tok([qwen_text(p) for p in alpaca_prompts], add_special_tokens=False)["input_ids"]
    assert len(dataset) == 800
    for index in range(800):
        item = dataset[index]
        assert item.dtype == torch.int64 and item.dim() == 1
        assert item.tolist() == expected[index]
    assert dataset[-1].tolist() == expected[-1]
    assert dataset.lengths.tolist() == [len(e) for e in expected]
    assert [t.tolist() for t in dataset.batch([5, 0, 799])] == [expected[5], expected[0], expected[799]]
    # the ids the trainer needs come from the sidecar, and agree with the tokenizer
    assert (dataset.eos_token_id, dataset.pad_token_id, dataset.bos_token_id) == \
           (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (2, 2, 1)
    assert dataset.meta["prompt_type"] == "qwen"
    # the prefix of the dataset itself is accepted too
    assert len(PromptDataset(f"{prompts_prefix}_packed_input_ids_document")) == 800
    with pytest.raises(IndexError):
        dataset[800]


def test_prompt_dataset_errors_and_foreign_datasets(tmp_path, prompts_prefix):
    with pytest.raises(FileNotFoundError, match="nothing_here_packed_input_ids_document"):
        PromptDataset(tmp_path / "nothing_here")
    # A prompt dataset written by another tool (int32, no metadata file) still loads; special ids are unknown.
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    path = f"{tmp_path / 'foreign'}_packed_input_ids_document"
    builder = IndexedDatasetBuilder(path + ".bin", dtype=np.int32)
    for doc in ([5, 6, 7], [70000, 1]):
        builder.add_item(torch.tensor(doc, dtype=torch.int32))
        builder.end_document()
    builder.finalize(path + ".idx")
    foreign = PromptDataset(tmp_path / "foreign")
    assert [foreign[i].tolist() for i in range(2)] == [[5, 6, 7], [70000, 1]]
    assert foreign.meta is None and foreign.eos_token_id is None
    # Several sequences in one document is not a prompt dataset.
    path = f"{tmp_path / 'multi'}_packed_input_ids_document"
    builder = IndexedDatasetBuilder(path + ".bin", dtype=np.int32)
    builder.add_item(torch.tensor([1, 2], dtype=torch.int32))
    builder.add_item(torch.tensor([3], dtype=torch.int32))
    builder.end_document()
    builder.finalize(path + ".idx")
    with pytest.raises(ValueError, match="one sequence per document"):
        PromptDataset(tmp_path / "multi")


def test_prompt_dataset_with_dataloader_and_left_padding(prompts_prefix):
    dataset = PromptDataset(prompts_prefix)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False,
                                         collate_fn=lambda items: pad_sequences(items, dataset.pad_token_id,
                                                                                pad_to_multiple_of=8))
    input_ids, mask = next(iter(loader))
    lengths = [len(dataset[i]) for i in range(4)]
    assert input_ids.shape[1] % 8 == 0 and input_ids.shape[1] >= max(lengths)
    for row, length in enumerate(lengths):
        assert mask[row].tolist() == [0] * (input_ids.shape[1] - length) + [1] * length
        assert input_ids[row, -length:].tolist() == dataset[row].tolist()
        assert (input_ids[row, : input_ids.shape[1] - length] == 2).all()


def test_pad_sequences_right_and_errors():
    ids, mask = pad_sequences([torch.tensor([4, 5, 6]), torch.tensor([7])], pad_token_id=0, side="right")
    assert ids.tolist() == [[4, 5, 6], [7, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError):
        pad_sequences([], 0)
    with pytest.raises(ValueError):
        pad_sequences([torch.tensor([1])], 0, side="middle")


# --------------------------------------------------------------------------------------------------- sampler

def test_sampler_orders_are_seeded_permutations():
    sampler = PromptSampler(800, 64, seed=11)
    order0, order1 = sampler.epoch_order(0).copy(), sampler.epoch_order(1).copy()
    assert sorted(order0.tolist()) == list(range(800)) and sorted(order1.tolist()) == list(range(800))
    assert not np.array_equal(order0, order1)
    assert np.array_equal(PromptSampler(800, 64, seed=11).epoch_order(1), order1)   # same on every rank / run
    assert not np.array_equal(PromptSampler(800, 64, seed=12).epoch_order(0), order0)
    assert np.array_equal(PromptSampler(800, 64, shuffle=False).epoch_order(3), np.arange(800))
    assert sampler.batches_per_epoch == 12
    # within an epoch no prompt is seen twice; 800 - 12 * 64 = 32 are left out, different ones next epoch
    epoch0 = np.concatenate([sampler.global_batch(i) for i in range(12)])
    epoch1 = np.concatenate([sampler.global_batch(i) for i in range(12, 24)])
    assert len(set(epoch0.tolist())) == 768 and len(set(epoch1.tolist())) == 768
    assert set(range(800)) - set(epoch0.tolist()) != set(range(800)) - set(epoch1.tolist())


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_sampler_splits_global_batches_across_ranks(dp_size):
    reference = PromptSampler(800, 64, seed=3)
    ranks = [PromptSampler(800, 64, dp_rank=r, dp_size=dp_size, seed=3) for r in range(dp_size)]
    for iteration in range(30):  # crosses two epoch boundaries
        locals_ = [next(s) for s in ranks]
        assert all(len(x) == 64 // dp_size and x.dtype == np.int64 for x in locals_)
        joined = np.concatenate(locals_)
        assert len(set(joined.tolist())) == 64                               # disjoint
        assert np.array_equal(joined, reference.global_batch(iteration))    # independent of dp_size
        assert all(np.array_equal(x, s.local_batch(iteration)) for x, s in zip(locals_, ranks))
    assert ranks[0].epoch == 2 and ranks[0].consumed_samples == 6 * 64


def test_sampler_resumes_exactly():
    straight = PromptSampler(800, 64, dp_rank=1, dp_size=2, seed=5)
    batches = [next(straight) for _ in range(30)]
    first = PromptSampler(800, 64, dp_rank=1, dp_size=2, seed=5)
    for _ in range(17):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    assert state["epoch"] == 1 and state["consumed_samples"] == 5 * 64 and state["total_consumed_samples"] == 17 * 64
    resumed = PromptSampler(800, 64, dp_rank=1, dp_size=2, seed=5)
    resumed.load_state_dict(state)
    for expected in batches[17:]:
        assert np.array_equal(next(resumed), expected)
    # A resumed run may change the global batch size: it continues from the same place in the same order.
    smaller = PromptSampler(800, 32, seed=5)
    smaller.load_state_dict(state)
    assert np.array_equal(smaller.next_global_batch(), PromptSampler(800, 64, seed=5).epoch_order(1)[320:352])
    with pytest.raises(ValueError, match="num_samples"):
        PromptSampler(799, 64, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        PromptSampler(800, 64, seed=6).load_state_dict(state)


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError, match="multiple of dp_size"):
        PromptSampler(800, 30, dp_size=4)
    with pytest.raises(ValueError, match="dp_rank"):
        PromptSampler(800, 64, dp_rank=2, dp_size=2)
    with pytest.raises(ValueError, match="cannot fill"):
        PromptSampler(10, 64)


# ----------------------------------------------------------------------------------------- preference pairs

def test_pairwise_dataset(tmp_path, shared_data, example_model_dir, tok):
    rows = pq.read_table(shared_data / "dpo_en_250.parquet").slice(0, 40).to_pylist()
    single_turn = [r for r in rows if r["history"] == "[]"]
    margins = [float(k) / 4 for k in range(len(single_turn))]
    table = pa.table({"prompt": [r["prompt"] for r in single_turn], "chosen": [r["chosen"] for r in single_turn],
                      "rejected": [r["rejected"] for r in single_turn], "margin": margins})
    pq.write_table(table, tmp_path / "pairs.parquet")
    run_preprocess(PreprocessConfig(input=str(tmp_path / "pairs.parquet"), output_prefix=str(tmp_path / "rm"),
                                    tokenizer_name_or_path=str(example_model_dir), prompt_type="qwen",
                                    handler_name="AlpacaStylePairwiseHandler", map_keys={"margin": "margin"}))
    pairs = PairwiseDataset(tmp_path / "rm")
    assert len(pairs) == len(single_turn) > 5 and pairs.has_margin
    assert pairs.eos_token_id == 2
    for index, row in enumerate(single_turn):
        chosen_ids, rejected_ids, prompt_length, margin = pairs[index]
        prompt = tok(qwen_text(row["prompt"]), add_special_tokens=False)["input_ids"]
        assert prompt_length == len(prompt) == int(pairs.prompt_lengths[index])
        assert chosen_ids.dtype == torch.int64
        assert chosen_ids.tolist() == prompt + tok(row["chosen"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert rejected_ids.tolist() == prompt + tok(row["rejected"] + "<|im_end|>",
                                                     add_special_tokens=False)["input_ids"]
        assert chosen_ids[-1].item() == rejected_ids[-1].item() == tok.convert_tokens_to_ids("<|im_end|>")
        assert margin == margins[index]
    # without a margin column the margin reads as 0.0
    run_preprocess(PreprocessConfig(input=str(tmp_path / "pairs.parquet"), output_prefix=str(tmp_path / "nomargin"),
                                    tokenizer_name_or_path=str(example_model_dir), prompt_type="qwen",
                                    handler_name="AlpacaStylePairwiseHandler"))
    plain = PairwiseDataset(tmp_path / "nomargin")
    assert not plain.has_margin and plain[0].margin == 0.0
    assert plain[0].chosen_ids.tolist() == pairs[0].chosen_ids.tolist()


def test_prompt_dataset_extra_columns_round_trip(tmp_path, shared_data, example_model_dir, alpaca_prompts):
    rows = pq.read_table(shared_data / "alpaca_en_800.parquet").slice(0, 40).to_pylist()
    answers = [str(len(r["output"].split())) for r in rows]
    sources = [["alpaca", str(k)] for k in range(40)]  # a list column stays a list
    table = pa.table({"instruction": [r["instruction"] for r in rows], "input": [r["input"] for r in rows],
                      "answer": answers, "data_source": sources})
    pq.write_table(table, tmp_path / "answers.parquet")
    run_preprocess(PreprocessConfig(input=str(tmp_path / "answers.parquet"), output_prefix=str(tmp_path / "ds"),
                                    tokenizer_name_or_path=str(example_model_dir), prompt_type="qwen",
                                    extra_columns=["answer", "data_source"]))
    dataset = PromptDataset(tmp_path / "ds")
    assert len(dataset) == 40 and dataset.extra_columns == ["answer", "data_source"]
    assert dataset.extras([5, 0, 39, 5, -1]) == {"answer": [answers[5], answers[0], answers[39], answers[5],
                                                            answers[39]],
                                                 "data_source": [sources[5], sources[0], sources[39], sources[5],
                                                                 sources[39]]}
    assert dataset.extras([]) == {"answer": [], "data_source": []}
    with pytest.raises(IndexError):
        dataset.extras([40])

    # a dataset without extra columns has none
    run_preprocess(PreprocessConfig(input=str(tmp_path / "answers.parquet"), output_prefix=str(tmp_path / "plain"),
                                    tokenizer_name_or_path=str(example_model_dir), max_samples=5))
    plain = PromptDataset(tmp_path / "plain")
    assert plain.extra_columns == [] and plain.extras([0, 1]) == {}

    # the metadata promises extra columns: a missing or short file is refused, naming it
    (tmp_path / "ds_extra.parquet").rename(tmp_path / "kept.parquet")
    with pytest.raises(ValueError, match="ds_extra.parquet not found"):
        PromptDataset(tmp_path / "ds")
    pq.write_table(pq.read_table(tmp_path / "kept.parquet").slice(0, 39), tmp_path / "ds_extra.parquet")
    with pytest.raises(ValueError, match="39 rows of extra columns for 40 prompts"):
        PromptDataset(tmp_path / "ds")
