"""Small-integer arithmetic: exactly checkable problems and their rule-based reward.

A problem is ``a + b`` or ``a - b`` with integer operands in ``[0, max_operand]`` (subtraction may go below
zero). Its prompt text (the dataset's ``instruction`` column) asks for the result on a line ``Answer: <number>``;
the chat template is applied at preprocessing.

Reward (``--reward-function posttrain.rewards.arithmetic:reward``), per response:

* ``1.0``: the response contains ``Answer:`` (any letter case) followed by optional spaces and an integer, the
  first such integer equals the result, and it is not the start of a longer number (``Answer: 13.5`` does not
  count as 13);
* ``format_reward`` (0 by default, so that the mean score of greedy validation is the accuracy): a well-formed
  ``Answer: <integer>`` with the wrong number;
* ``0.0``: no well-formed answer (no ``Answer:``, or not followed by an integer).

The problem is read back from the prompt text (the last ``a + b`` / ``a - b`` in it), so the reward needs no
extra dataset column; a prompt without one is an error.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence

INSTRUCTION = "Calculate {problem}. End your reply with 'Answer: ' followed by the number."
"""The user turn of every prompt (``{problem}`` is ``a + b`` or ``a - b``)."""

OPERATIONS = ("+", "-")
PROBLEM_RE = re.compile(r"(\d+) ([+-]) (\d+)")
ANSWER_RE = re.compile(r"answer:[ \t]*(-?\d+)(?!\.?\d)", re.IGNORECASE)


@dataclass(frozen=True)
class Problem:
    """``a op b`` with ``op`` in :data:`OPERATIONS`."""

    a: int
    op: str
    b: int

    def __post_init__(self):
        if self.op not in OPERATIONS:
            raise ValueError(f"unknown operation {self.op!r}; valid: {', '.join(OPERATIONS)}")

    @property
    def text(self) -> str:
        return f"{self.a} {self.op} {self.b}"

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    @property
    def key(self) -> tuple:
        """Identity for train/held-out disjointness: ``a + b`` and ``b + a`` are the same problem."""
        return ("+", *sorted((self.a, self.b))) if self.op == "+" else ("-", self.a, self.b)

    @property
    def instruction(self) -> str:
        return INSTRUCTION.format(problem=self.text)


def all_problems(max_operand: int, operations: Sequence[str] = OPERATIONS) -> list[Problem]:
    """Every ``a op b`` with ``0 <= a, b <= max_operand``, in a fixed order."""
    if max_operand < 1:
        raise ValueError(f"max_operand must be >= 1, got {max_operand}")
    return [Problem(a, op, b) for op in operations for a in range(max_operand + 1) for b in range(max_operand + 1)]


def split_problems(problems: Sequence[Problem], eval_size: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Shuffle ``problems`` with ``seed`` and split them into ``(train, held_out)`` with ``eval_size`` held-out
    problems, disjoint by :attr:`Problem.key` (both orders of a sum go to the same side).

    Raises:
        ValueError: ``eval_size`` leaves no training problem, or is below 1.
    """
    groups: dict[tuple, list[Problem]] = {}
    for p in problems:
        groups.setdefault(p.key, []).append(p)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    held_out: list[Problem] = []
    train: list[Problem] = []
    for key in keys:
        if len(held_out) < eval_size:
            held_out.append(groups[key][0])  # one order of a sum is enough to hold out
        else:
            train.extend(groups[key])
    if eval_size < 1 or len(held_out) < eval_size or not train:
        raise ValueError(f"cannot hold out {eval_size} of {len(keys)} distinct problems and keep some to train on")
    random.Random(seed + 1).shuffle(train)
    return train, held_out


def problem_from_prompt(prompt: str) -> Problem:
    """The problem a prompt asks (its last ``a + b`` / ``a - b``).

    Raises:
        ValueError: the prompt holds no problem.
    """
    found = PROBLEM_RE.findall(prompt)
    if not found:
        raise ValueError(f"no 'a + b' or 'a - b' problem in the prompt {prompt[-200:]!r}")
    a, op, b = found[-1]
    return Problem(int(a), op, int(b))


def parse_answer(response: str) -> Optional[int]:
    """The integer of the first well-formed ``Answer: <integer>`` in ``response``, or None."""
    match = ANSWER_RE.search(response)
    return int(match.group(1)) if match else None


def score(problem: Problem, response: str, format_reward: float = 0.0) -> float:
    """1 for the right answer, ``format_reward`` for a well-formed wrong one, 0 otherwise (module docstring)."""
    given = parse_answer(response)
    if given is None:
        return 0.0
    return 1.0 if given == problem.answer else format_reward


def reward(prompts: list[str], responses: list[str]) -> list[float]:
    """``--reward-function posttrain.rewards.arithmetic:reward``: one score per response, 1.0 when it answers the
    problem of its prompt correctly, else 0.0 (module docstring).

    Args:
        prompts, responses: decoded texts, one prompt per response (the trainer repeats a prompt for each sample).

    Raises:
        ValueError: a prompt holds no ``a + b`` / ``a - b`` problem.
    """
    return [score(problem_from_prompt(p), r) for p, r in zip(prompts, responses)]


def reward_with_format(prompts: list[str], responses: list[str]) -> list[float]:
    """``--reward-function posttrain.rewards.arithmetic:reward_with_format``: 1 correct, 0.1 for a well-formed
    wrong answer, 0 otherwise (the mean validation score is then no longer the accuracy).

    Raises:
        ValueError: a prompt holds no ``a + b`` / ``a - b`` problem.
    """
    return [score(problem_from_prompt(p), r, format_reward=0.1) for p, r in zip(prompts, responses)]
