#!/usr/bin/env python
"""Training entry point: ``torchrun ... pretrain_gpt.py --stage trl_ppo|rm [flags]``.

``--stage trl_ppo`` runs PPO (:mod:`posttrain.trl_ppo.trainer`); ``--stage rm`` trains a reward model on preference
pairs (:mod:`posttrain.rm.trainer`). ``pretrain_gpt.py --stage STAGE --help`` lists a stage's flags.
"""
import importlib
import sys

if __name__ == "__main__":  # before torch is imported: on CPU, may run again with tcmalloc preloaded
    from posttrain.allocator import AllocatorError, use_tcmalloc

    try:
        use_tcmalloc()
    except AllocatorError as exc:
        sys.exit(f"error: {exc}")

from posttrain.environment import silence_known_warnings  # noqa: E402

STAGES = {
    "trl_ppo": ("posttrain.trl_ppo.trainer", "PPO: actor, reference, critic and reward models (RLHF)"),
    "rm": ("posttrain.rm.trainer", "reward-model training on preference pairs (pairwise loss)"),
}

USAGE = """usage: pretrain_gpt.py --stage STAGE [flags]
       torchrun --nproc_per_node N pretrain_gpt.py --stage STAGE [flags]

stages:
{stages}

Each stage's flags: pretrain_gpt.py --stage STAGE --help
"""


def _usage() -> str:
    return USAGE.format(stages="\n".join(f"  {name:<9} {text}" for name, (_, text) in STAGES.items()))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = None
    for i, item in enumerate(argv):
        if item == "--stage" and i + 1 < len(argv):
            stage = argv[i + 1]
            del argv[i:i + 2]
            break
        if item.startswith("--stage="):
            stage = item.split("=", 1)[1]
            del argv[i]
            break
    if stage is None and any(a in ("-h", "--help") for a in argv):
        print(_usage())
        return 0
    if stage not in STAGES:
        print(_usage(), file=sys.stderr)
        print(f"error: --stage must be one of {', '.join(STAGES)} (got {stage!r})", file=sys.stderr)
        return 2
    silence_known_warnings()  # before megatron-core is imported: some of its notices come at import time
    return importlib.import_module(STAGES[stage][0]).main(argv)


if __name__ == "__main__":
    sys.exit(main())
