"""torchrun worker for tests/test_cpu_matmul.py: ranks started with different ``POSTTRAIN_CPU_MATMUL`` choices end
up using rank 0's (``posttrain.cpu_matmul.adopt_rank0_choice`` in ``initialize_distributed``)."""
import argparse
import os

import torch

from tests.torchrun_utils import write_rank_result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--choices", required=True, help="comma-separated, one per rank")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    os.environ["POSTTRAIN_CPU_MATMUL"] = args.choices.split(",")[rank]

    from posttrain import cpu_matmul
    from posttrain.distributed import destroy_distributed, initialize_distributed

    initialize_distributed(seed=3)
    a = torch.randn(1024, 576, generator=torch.Generator().manual_seed(0))
    b = torch.randn(576, 1536, generator=torch.Generator().manual_seed(1))
    product = a @ b
    default = torch.ops.aten.mm.out(a, b, out=torch.empty(1024, 1536))
    write_rank_result(args.out_dir, {"choice": cpu_matmul.install(), "describe": cpu_matmul.describe(),
                                     "equals_default_kernel": bool(torch.equal(product, default)),
                                     "checksum": float(product.double().sum())})
    destroy_distributed()


if __name__ == "__main__":
    main()
