r"""Where a completion's final answer is, and when it has none. Shared by the math, logic and code rewards.

Policy; each rule closes a reward hack or a way to be misread:
- Only text after the last ``</think>`` counts, and a ``<think>`` never closed means no answer: an answer
  written only inside the think block earns nothing, so the policy cannot hedge there.
- At most one ``<answer>...</answer>`` block: several blocks (a hedge) or an unclosed one mean no answer.
- In the answer region, ``\boxed{}`` wins; several boxes must hold the same text (different boxes are a
  hedge) and a box left open (a truncated completion) means no answer. Nesting is parsed in one linear pass.
- Else the last "the answer is X" / "final answer: X" phrase: the formula right after it (``$...$``, ``\(...\)``,
  ...) when there is one, so "The final answer is $28$. I hope it is correct." gives ``$28$``, else the rest of
  its line; else the whole answer block; else, without
  an answer block, the last standalone number on the last line that has a digit (an untrained model
  answering in prose). A number glued to an operator (``9**9``, ``2^10``) is not standalone.
- Digits are ASCII ``0-9`` only: fullwidth, Arabic-Indic or superscript look-alikes are not digits.
A final answer containing "or" (``3 or 4``, ``\lor``) is a hedge; ``is_hedged`` lets rewards refuse it.
"""

from __future__ import annotations

import re

_BRACES = re.compile(r"\\[{}]|\\boxed\s*\{|\\fbox\s*\{|[{}]")
_ANSWER_PHRASE = re.compile(r"(?:final answer|the answer)\s*(?:is\b|:)\s*:?\s*", re.IGNORECASE)
_LEADING_MATH = re.compile(r"\$\$.+?\$\$|\$.+?\$|\\\(.+?\\\)|\\\[.+?\\\]", re.DOTALL)
_STANDALONE_NUMBER = re.compile(r"(?<![\w.*^/+\-])[+-]?[0-9]+(?:\.[0-9]+)?(?:/[0-9]+)?(?![\w*^/+\-]|\.[0-9])",
                                re.ASCII)
_THOUSANDS = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")
_HEDGE = re.compile(r"\bor\b|\\lor\b|\\vee\b", re.IGNORECASE)


def visible_text(text: str) -> str | None:
    """The text after the last ``</think>``; all of it if there is no think block; None if thinking never ended."""
    end = text.rfind("</think>")
    if end >= 0:
        return text[end + len("</think>"):]
    return None if "<think>" in text else text


def answer_region(text: str) -> tuple[str | None, bool]:
    """(region, tagged): the single answer block's content if the visible text has answer tags, else the whole
    visible text; region is None when the completion has no answer (thinking unfinished, several blocks)."""
    visible = visible_text(text)
    if visible is None:
        return None, False
    opens, closes = visible.count("<answer>"), visible.count("</answer>")
    if opens == closes == 0:
        return visible, False
    start, end = visible.find("<answer>"), visible.find("</answer>")
    if opens != 1 or closes != 1 or end < start:
        return None, True
    return visible[start + len("<answer>"):end], True


def answer_block(text: str) -> str | None:
    """The content of the completion's single visible ``<answer>`` block, stripped; None if not exactly one."""
    region, tagged = answer_region(text)
    return region.strip() if tagged and region is not None else None


def boxed_contents(text: str) -> list[str] | None:
    r"""The contents of the outermost ``\boxed{}``/``\fbox{}`` groups; None if one is left unclosed."""
    contents, stack, open_boxes = [], [], 0
    for match in _BRACES.finditer(text):
        token = match.group()
        if token.startswith("\\") and len(token) == 2:  # \{ and \} are literal braces in LaTeX
            continue
        if token != "}":
            is_box = token != "{"
            stack.append((is_box, match.end()))
            open_boxes += is_box
        elif stack:
            is_box, start = stack.pop()
            if is_box:
                open_boxes -= 1
                if open_boxes == 0:
                    contents.append(text[start:match.start()])
    return None if open_boxes else contents


def _last_number(text: str) -> str | None:
    lines = [line for line in text.splitlines() if re.search(r"[0-9]", line)]
    if not lines or is_hedged(lines[-1]):
        return None
    numbers = _STANDALONE_NUMBER.findall(_THOUSANDS.sub("", lines[-1]))
    return numbers[-1] if numbers else None


def _phrase_answer(rest: str) -> str | None:
    """What follows the last answer phrase: the formula it opens with, else the rest of its line."""
    formula = _LEADING_MATH.match(rest)
    answer = formula.group() if formula else rest.split("\n", 1)[0]
    return answer.strip().rstrip(".").strip() or None


def final_answer(text: str) -> str | None:
    """The completion's final answer under the policy above, stripped; None when it has none."""
    region, tagged = answer_region(text)
    if region is None:
        return None
    boxes = boxed_contents(region)
    if boxes is None:
        return None
    if boxes:
        distinct = {"".join(box.split()) for box in boxes}
        return boxes[-1].strip() if len(distinct) == 1 else None
    phrases = list(_ANSWER_PHRASE.finditer(region))
    if phrases:
        return _phrase_answer(region[phrases[-1].end():])
    if tagged:
        return region.strip() or None
    return _last_number(region)


def is_hedged(answer: str) -> bool:
    """True when the answer offers alternatives ("3 or 4")."""
    return _HEDGE.search(answer) is not None
