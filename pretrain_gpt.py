#!/usr/bin/env python
"""Training entry point: ``torchrun ... pretrain_gpt.py --stage trl_ppo|rm [flags]``.

``--stage trl_ppo`` runs PPO (posttrain.trl_ppo.trainer); ``--stage rm`` trains a reward model on preference
pairs (posttrain.rm.trainer). ``pretrain_gpt.py --stage STAGE --help`` lists a stage's flags.
"""
import sys

STAGES = {
    "trl_ppo": "posttrain.trl_ppo.trainer",
    "rm": "posttrain.rm.trainer",
}


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
    if stage not in STAGES:
        print(f"error: --stage must be one of {', '.join(STAGES)} (got {stage!r})", file=sys.stderr)
        return 2
    import importlib
    import warnings

    # megatron-core's notices about optional GPU libraries and deprecated torch APIs say nothing actionable here
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(megatron|torch)\..*")

    return importlib.import_module(STAGES[stage]).main(argv)


if __name__ == "__main__":
    sys.exit(main())
