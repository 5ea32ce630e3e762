"""Worker for tests/training/test_engine.py: one tiny GPTModel training step under a given parallel layout.

``--mode ref`` (world size 1) builds the model, saves it with dist_checkpointing, and records the loss before
and after one Adam step; the other modes load that checkpoint under TP=2, PP=2 or DP=2 (megatron DDP) and record
the same two losses, computed through megatron's forward-backward schedule with the same micro-batches.
"""
import argparse
import os

import torch

GLOBAL_BATCH, MICRO_BATCH, SEQ, VOCAB = 4, 2, 16, 128


def build(config_kwargs):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(), **config_kwargs)
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=VOCAB, max_sequence_length=64, position_embedding_type="rope",
                     pre_process=parallel_state.is_pipeline_first_stage(),
                     post_process=parallel_state.is_pipeline_last_stage())
    return config, model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--mode", choices=["ref", "tp2", "pp2", "dp2"], required=True)
    parser.add_argument("--ckpt", required=True)
    args = parser.parse_args()

    from posttrain.distributed import destroy_distributed, initialize_distributed

    tp, pp = {"ref": (1, 1), "tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}[args.mode]
    state = initialize_distributed(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=7)

    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tests.torchrun_utils import write_rank_result

    config, model = build({})
    if args.mode == "ref":
        os.makedirs(args.ckpt, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), args.ckpt)
    else:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.ckpt))

    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    # as Megatron-LM's training loop: the schedule reduces DP gradients through finalize_model_grads
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0), [ddp])

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=generator)
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    local = tokens.chunk(dp_size)[dp_rank]
    micro_batches = [local[i:i + MICRO_BATCH] for i in range(0, local.shape[0], MICRO_BATCH)]
    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch[:, :-1], positions, None, labels=batch[:, 1:])

        def loss_func(per_token_loss):
            loss = per_token_loss.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return output, loss_func

    def train_step(forward_only):
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[ddp],
            num_microbatches=len(micro_batches), seq_length=SEQ, micro_batch_size=MICRO_BATCH,
            forward_only=forward_only)
        loss = torch.zeros(1)
        if parallel_state.is_pipeline_last_stage():
            loss += sum(item["loss"] for item in losses) / len(losses)
        # average over data-parallel ranks, then share the last stage's value with every stage
        torch.distributed.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss /= dp_size
        torch.distributed.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
        if not forward_only:
            success, grad_norm, _ = optimizer.step()
            assert success
        return loss.item()

    loss_before = train_step(forward_only=False)
    loss_after = train_step(forward_only=True)
    write_rank_result(args.out_dir, {"loss_before": loss_before, "loss_after": loss_after,
                                     "world_size": state.world_size, "backend": state.backend,
                                     "cpu_backend": state.cpu_backend})
    # as every stage does when it ends (run_stage): gloo's groups torn down before the interpreter exits
    destroy_distributed()


if __name__ == "__main__":
    main()
