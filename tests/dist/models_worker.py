"""torchrun worker for tests/models/test_provider.py: forward passes of converted checkpoints at TP / PP / EP > 1.

Each ``--case NAME:LAYOUT:CKPT`` runs in turn in the same process group (the parallel layout is re-created when
it changes from one case to the next, so list cases grouped by layout). Inputs come from ``<out-dir>/inputs.pt``
(per case: ``input_ids``, ``attention_mask``, ``position_ids``); the rank holding the complete output (last
pipeline stage, tensor-parallel rank 0) saves it as ``<out-dir>/<NAME>.pt``.
Causal LMs save logits gathered over TP and cut to the real vocabulary ``[b, s, V]``; value models save
``values [b, s]``. Every rank reports facts about its model in ``rank<k>.json``.

LAYOUT is ``tpXppYepZ``. A case named ``*_save`` also writes the loaded model back with
``save_model_checkpoint`` to ``<out-dir>/<NAME>_ckpt`` (resharding test).
"""
from __future__ import annotations

import argparse
import hashlib
import re
import time
from pathlib import Path

import torch

from tests.torchrun_utils import write_rank_result


def _layout(text: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"tp(\d+)pp(\d+)ep(\d+)", text)
    if not match:
        raise SystemExit(f"bad layout {text!r}")
    return tuple(int(g) for g in match.groups())


def _pipeline_forward(model, input_ids, position_ids, attention_mask):
    """Forward-only pass through megatron-core's pipeline schedule; the output on the last stage, else None."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model_chunk):
        output = model_chunk(input_ids, position_ids, attention_mask)

        def collect(output_tensor, non_loss_data=False):
            return output_tensor

        return output, collect

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([None]), model=[model], num_microbatches=1,
        seq_length=input_ids.shape[1], micro_batch_size=input_ids.shape[0], forward_only=True,
        collect_non_loss_data=True)
    return outputs[0] if outputs else None


def run_case(name: str, layout: str, ckpt: str, out_dir: Path, inputs: dict) -> dict:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from posttrain.distributed import initialize_distributed
    from posttrain.models import (build_attention_mask, build_model, load_model_checkpoint, read_checkpoint_meta,
                                  real_vocab_size, save_model_checkpoint, unwrap_model)

    tp, pp, ep = _layout(layout)
    current = ((parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_expert_model_parallel_world_size())
               if parallel_state.model_parallel_is_initialized() else None)
    if current != (tp, pp, ep):  # else keep the previous case's groups (gloo groups are slow to create)
        initialize_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                               expert_model_parallel_size=ep, seed=4321)
    meta = read_checkpoint_meta(ckpt)
    model = build_model(meta["hf_config"], meta["model_kind"])
    load_model_checkpoint(model, ckpt)
    model.eval()
    ids, mask2d, pos = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    with torch.no_grad():
        if pp > 1:
            out = _pipeline_forward(model, ids, pos, build_attention_mask(mask2d))
        else:
            out = model(ids, pos, build_attention_mask(mask2d))
        last = parallel_state.is_pipeline_last_stage()
        if last and meta["model_kind"] == "causal_lm":
            out = gather_from_tensor_model_parallel_region(out)[..., :real_vocab_size(model)]
    inner = unwrap_model(model)
    report = {"case": name, "last_stage": last, "has_value_head": hasattr(inner, "value_head"),
              "has_output_layer": getattr(inner, "output_layer", None) is not None,
              "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
              "padded_vocab_size": inner.vocab_size}
    if hasattr(inner, "value_head"):
        weight = inner.value_head.linear.weight.detach().contiguous()
        report["value_head_sha"] = hashlib.sha256(weight.numpy().tobytes()).hexdigest()
    if last and parallel_state.get_tensor_model_parallel_rank() == 0:
        torch.save(out.float().clone(), out_dir / f"{name}.pt")
    if name.endswith("_save"):
        save_model_checkpoint(model, out_dir / f"{name}_ckpt", tokenizer_dir=None)
    torch.distributed.barrier()
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--case", action="append", required=True, help="NAME:tpXppYepZ:CKPT_DIR")
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    inputs = torch.load(out_dir / "inputs.pt")
    reports = {}
    for spec in args.case:
        name, layout, ckpt = spec.split(":", 2)
        start = time.perf_counter()
        reports[name] = run_case(name, layout, ckpt, out_dir, inputs[name])
        reports[name]["seconds"] = round(time.perf_counter() - start, 2)
    write_rank_result(out_dir, reports)


if __name__ == "__main__":
    main()
