"""torchrun worker for tests/test_parallel.py: the parallelism layer under TP = 2, PP = 2 or DP = 2.

Every rank builds the same full-vocabulary logits from one seed, keeps its TP shard, and writes what
``posttrain.parallel`` computed next to what it must equal (float64 formulas over the full logits), so the test
compares numbers without trusting the layer it tests.
"""
import argparse

import torch

from posttrain import parallel
from posttrain.distributed import destroy_distributed, initialize_distributed
from tests.torchrun_utils import write_rank_result

VOCAB, PADDED = 250, 256  # a padded vocabulary, as megatron pads it


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--mode", choices=["tp2", "pp2", "dp2"], required=True)
    args = parser.parse_args()
    tp, pp = {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}[args.mode]
    initialize_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=11)
    result = {}

    generator = torch.Generator().manual_seed(5)
    full = torch.randn(2, 3, PADDED, generator=generator, dtype=torch.float64) * 4
    full[:, 1] *= 30  # peaked rows
    labels = torch.randint(0, VOCAB, (2, 3), generator=generator)
    shard = PADDED // tp
    rank = torch.distributed.get_rank() % tp if tp > 1 else 0
    local = full[..., rank * shard:(rank + 1) * shard].float().clone().requires_grad_()
    masked = parallel.mask_padded_vocab(local, VOCAB)
    entropy = parallel.vocab_parallel_entropy(masked)
    log_probs = parallel.vocab_parallel_log_probs(masked.clone(), labels)
    (log_probs.sum() + entropy.sum()).backward()
    real = full[..., :VOCAB]
    log_softmax = torch.log_softmax(real, -1)
    expected_entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    expected_log_probs = log_softmax.gather(-1, labels[..., None])[..., 0]
    # d/dx [log p_label + H] over the real vocabulary, float64 autograd of the same formulas
    x = real.clone().requires_grad_()
    ls = torch.log_softmax(x, -1)
    (ls.gather(-1, labels[..., None]).sum() - (ls.exp() * ls).sum()).backward()
    expected_grad = torch.cat([x.grad, torch.zeros(2, 3, PADDED - VOCAB, dtype=torch.float64)], -1)
    result.update(
        entropy_err=(entropy.double() - expected_entropy).abs().max().item(),
        log_prob_err=(log_probs.double() - expected_log_probs).abs().max().item(),
        grad_err=(local.grad.double() - expected_grad[..., rank * shard:(rank + 1) * shard]).abs().max().item())

    value = torch.tensor([float(parallel.dp_rank() + 1)], dtype=torch.float64)
    result["dp_sum"] = parallel.dp_all_reduce(value).item()
    result["dp_max"] = parallel.dp_all_reduce(torch.tensor([float(parallel.dp_rank())]),
                                              op=torch.distributed.ReduceOp.MAX).item()
    last = parallel.is_last_stage()
    sent = torch.arange(6, dtype=torch.float32).reshape(2, 3) if last else None
    result["broadcast"] = parallel.broadcast_from_last_stage(sent, (2, 3), torch.float32).tolist()
    result["broadcast_object"] = parallel.broadcast_object_from_last_stage({"from_last": last})
    write_rank_result(args.out_dir, result)
    destroy_distributed()


if __name__ == "__main__":
    main()
