"""Prompt text: the R1 system prompt and how chat messages become a model's input string."""

from __future__ import annotations

from typing import Any

R1_SYSTEM_PROMPT = (
    "You are a helpful assistant. Think step by step inside <think> </think> tags, "
    "then give only the final answer inside <answer> </answer> tags."
)


def chat(question: str, system: str = R1_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The chat messages of one prompt: the R1 system prompt and the question."""
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def worked_solution(reasoning: str, answer: str) -> str:
    """A completion in the layout the R1 prompt asks for: the cold-start SFT target of a row."""
    return f"<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>"


def render_plain(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """A plain-text transcript for base models that ship no chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    if add_generation_prompt:
        lines.append("Assistant:")
    return "\n".join(lines)


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The model's input text: its chat template when it has one, else ``render_plain``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return render_plain(messages, add_generation_prompt)
