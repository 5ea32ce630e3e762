"""torchrun worker for tests/trl_ppo/test_trainer.py: runs ``--stage trl_ppo`` in this process and records,
at every validation and every PPO iteration, the order of events and how far the actor's weights are from the
checkpoint it was loaded from.

The loaded weights are those of the reference model, read from the same ``--ref-model`` checkpoint and never
trained. Arguments after ``--out-dir DIR`` go to ``pretrain_gpt.py --stage trl_ppo``. Each rank writes
``rank<k>.json``: ``{"events": [...], "exit_code": int}``; an event is ``{"kind": "evaluate" | "step", "iteration",
"actor_ref_max_diff", "actor_lr_steps", "metrics", "samples"}`` (metrics: what ``evaluate`` returned; samples: the
first ``--log-samples`` validation rows of this rank, ``{"prompt", "response", "score", ...}`` in the order of its
held-out prompts; both None for a step).
"""
from __future__ import annotations

import sys

from tests.torchrun_utils import write_rank_result


def _max_diff(trainer) -> float:
    actor = dict(trainer.actor.model.named_parameters())
    reference = dict(trainer.reference.model.named_parameters())
    assert actor.keys() == reference.keys()
    return max((actor[k].detach().float() - reference[k].detach().float()).abs().max().item() for k in actor)


def main() -> None:
    argv = sys.argv[1:]
    at = argv.index("--out-dir")
    out_dir, ppo_argv = argv[at + 1], argv[:at] + argv[at + 2:]

    from posttrain.trl_ppo import trainer as trainer_module

    events: list[dict] = []
    cls = trainer_module.PPOTrainer
    evaluate, step = cls.evaluate, cls.step

    def record(self, kind: str, metrics=None, samples=None) -> None:
        events.append({"kind": kind, "iteration": self.iteration, "actor_ref_max_diff": _max_diff(self),
                       "actor_lr_steps": int(self.actor.scheduler.num_steps), "metrics": metrics,
                       "samples": samples})

    def recording_evaluate(self):
        metrics = evaluate(self)
        record(self, "evaluate", {k: float(v) for k, v in metrics.items()}, list(self._eval_samples))
        return metrics

    def recording_step(self):
        record(self, "step")
        return step(self)

    cls.evaluate, cls.step = recording_evaluate, recording_step
    code = trainer_module.main(ppo_argv)
    write_rank_result(out_dir, {"events": events, "exit_code": code})


if __name__ == "__main__":
    main()
