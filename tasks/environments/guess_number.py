"""The number-guessing game's other player: it answers each guess with "higher", "lower" or "correct".

Rows come from the ``guess_number`` task (the secret is the row's ``answer``); the reward is
``guess_number_solved``. A turn ends at the end of the policy's message or right after its ``</guess>`` (so a
turn is one move: nothing the policy writes past its guess is kept); the reply is a user message, which closes
the policy's message through the chat template. The episode ends on the correct guess or at ``rollout.max_turns``.
A turn without a guess is answered with the rule again, and costs the turn.
"""

from __future__ import annotations

from typing import Any

from rewards.episodes import parse_guess
from tasks.environments import Message, Observation, environment

HIGHER, LOWER, CORRECT = "higher", "lower", "correct"
REMINDER = "Give one guess as <guess>N</guess>."


def reply(secret: int, guess: int | None) -> str:
    if guess is None:
        return REMINDER
    return CORRECT if guess == secret else HIGHER if secret > guess else LOWER


@environment("guess_number")
class GuessNumber:
    stop = ("</guess>",)

    def reset(self, row: dict[str, Any]) -> list[Message]:
        return row["prompt"]

    def step(self, state: dict[str, Any], text: str) -> tuple[Observation | None, bool]:
        answer = reply(int(state["row"]["answer"]), parse_guess(text))
        return {"role": "user", "content": answer}, answer == CORRECT
