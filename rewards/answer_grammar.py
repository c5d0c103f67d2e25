"""Strict grammars for the reasoning-gym answers whose scorers evaluate them as Python.

A scorer that hands the answer to ``eval`` or sympy's ``parse_expr`` runs the answer as code in the job whose
framed output the trainer trusts, so an answer could walk ``gc.get_objects()`` to the job's secret and print a
forged verdict. Here, in the trainer, an answer of such a family is parsed into plain data (numbers, operators,
lists of numbers or short words) without evaluating anything, and the scorer is handed a canonical string
re-built from that data: what it evaluates can only be numbers, operators, brackets and quoted words. An
answer that does not parse scores 0 without reaching the scorer.

Families of reasoning-gym 0.1.25 whose ``score_answer`` evaluates text (``tests/test_answer_grammar.py`` audits
the installed package so a new one cannot slip through):

| family | scorer does | handed to the scorer |
| --- | --- | --- |
| countdown, puzzle24 | ``parse_expr(answer)`` | integers, ``+ - * /`` and parentheses, one space between tokens |
| binary_matrix | ``eval`` for a literal answer | a grid of integers (rows on lines) or a literal list of integer lists |
| spiral_matrix | ``eval`` for a literal answer | integers separated by spaces, or a literal list of integers |
| n_queens | ``eval`` for a literal answer | a grid of ``Q``/``_`` cells, or a literal list of lists of them |
| string_insertion | ``eval`` for a literal answer | the gold string itself, else a literal list of the answer's letters |
| number_sorting | ``eval`` of the gold answer only | the answer unchanged (it only goes through ``json.loads``) |
| polynomial_multiplication, simple_integration, intermediate_integration, composite | ``parse_expr`` of symbolic answers (composite forwards to any family) | refused: ``check_family`` raises, and ``logic_accuracy`` scores their rows 0 |

Whitespace inside a grid or expression is normalised, so ``0  1`` scores as ``0 1`` does.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

REFUSED = ("polynomial_multiplication", "simple_integration", "intermediate_integration", "composite")
MAX_DEPTH = 50  # parentheses and signs nested deeper than this do not parse
_TOKEN = re.compile(r"\s*(?:([0-9]{1,20})|([-+*/()]))", re.ASCII)
_WORD = re.compile(r"[A-Za-z_]{1,40}", re.ASCII)
_LETTERS = re.compile(r"[A-Za-z]{1,10000}", re.ASCII)
_GRID_INTEGER = re.compile(r"-?[0-9]{1,20}", re.ASCII)

Grammar = Callable[[str, str], str]  # (answer, gold) -> canonical answer; raises _NoParse


class _NoParse(ValueError):
    """The answer is outside the family's grammar."""


def check_family(family: str) -> None:
    """Raise for a family whose scorer evaluates answers this module has no grammar for."""
    if family in REFUSED:
        raise ValueError(
            f"{family}: its reasoning-gym scorer evaluates symbolic answers as Python and no strict grammar covers "
            "them, so it cannot be scored safely"
        )


def _tokens(text: str) -> list[str]:
    tokens, position, end = [], 0, len(text.rstrip())
    while position < end:
        match = _TOKEN.match(text, position)
        if match is None:
            raise _NoParse(text)
        tokens.append(match.group(1) or match.group(2))
        position = match.end()
    return tokens


class _Expression:
    """Recursive descent over ``expr := term (+|- term)*``, ``term := factor (*|/ factor)*``,
    ``factor := (+|-) factor | integer | ( expr )``; it only checks the shape, it computes nothing."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens, self.at = tokens, 0

    def _peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def _take(self) -> str:
        token = self._peek()
        if token is None:
            raise _NoParse("unexpected end")
        self.at += 1
        return token

    def expression(self, depth: int = 0) -> None:
        self.term(depth)
        while self._peek() in ("+", "-"):
            self._take()
            self.term(depth)

    def term(self, depth: int) -> None:
        self.factor(depth)
        while self._peek() in ("*", "/"):
            self._take()
            self.factor(depth)

    def factor(self, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise _NoParse("nested too deep")
        token = self._take()
        if token in ("+", "-"):
            self.factor(depth + 1)
        elif token == "(":
            self.expression(depth + 1)
            if self._take() != ")":
                raise _NoParse("unclosed parenthesis")
        elif not token.isdigit():
            raise _NoParse(f"unexpected {token!r}")


def arithmetic(answer: str, gold: str) -> str:
    """An integer expression with ``+ - * /`` and parentheses, tokens joined by one space."""
    tokens = _tokens(answer)
    parser = _Expression(tokens)
    parser.expression()
    if parser.at != len(tokens):
        raise _NoParse("trailing tokens")
    return " ".join(tokens)


def _literal(node: ast.AST, leaf: Callable[[ast.AST], Any], depth: int) -> Any:
    if depth == 0:
        return leaf(node)
    if not isinstance(node, ast.List | ast.Tuple):
        raise _NoParse("not a list")
    return [_literal(item, leaf, depth - 1) for item in node.elts]


def _integer(node: ast.AST) -> int:
    negative = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
    value = node.operand if negative else node
    if not (isinstance(value, ast.Constant) and type(value.value) is int):
        raise _NoParse("not an integer")
    return -value.value if negative else value.value


def _word(node: ast.AST) -> str:
    if not (isinstance(node, ast.Constant) and type(node.value) is str and _WORD.fullmatch(node.value)):
        raise _NoParse("not a word")
    return node.value


def parse_literal(answer: str, leaf: Callable[[ast.AST], Any], depth: int) -> Any:
    """A Python list literal nested ``depth`` deep with leaves ``leaf`` accepts, as plain data; parsed, not run."""
    try:
        tree = ast.parse(answer.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise _NoParse("not a literal") from exc
    return _literal(tree.body, leaf, depth)


def _looks_literal(answer: str) -> bool:
    return answer.lstrip().startswith(("[", "("))


def _grid(answer: str, cell: re.Pattern[str]) -> list[list[str]]:
    rows = [line.split() for line in answer.strip().splitlines() if line.strip()]
    if not rows or not all(cell.fullmatch(item) for row in rows for item in row):
        raise _NoParse("not a grid")
    return rows


def _render_grid(rows: list[list[Any]]) -> str:
    return "\n".join(" ".join(str(item) for item in row) for row in rows)


def integer_matrix(answer: str, gold: str) -> str:
    """Rows of integers, or a literal list of integer lists."""
    if _looks_literal(answer):
        return repr(parse_literal(answer, _integer, 2))
    return _render_grid([[str(int(item)) for item in row] for row in _grid(answer, _GRID_INTEGER)])


def integer_row(answer: str, gold: str) -> str:
    """Integers separated by whitespace, or a literal list of integers."""
    if _looks_literal(answer):
        return repr(parse_literal(answer, _integer, 1))
    return " ".join(str(int(item)) for row in _grid(answer, _GRID_INTEGER) for item in row)


def queens_board(answer: str, gold: str) -> str:
    """Rows of ``Q``/``_`` cells (two or more a row, so the text is never valid Python), or a literal of them."""
    if _looks_literal(answer):
        return repr(parse_literal(answer, _word, 2))
    rows = _grid(answer, re.compile("[Q_]"))
    if any(len(row) < 2 for row in rows):
        raise _NoParse("a board row has fewer than two cells")
    return _render_grid(rows)


def letters(answer: str, gold: str) -> str:
    """A word: handed over as is when it is the gold answer (the scorer's exact match), else as a literal list of
    its letters, so the scorer never evaluates a bare name; or a literal list of words."""
    if _looks_literal(answer):
        return repr(parse_literal(answer, _word, 1))
    word = answer.strip()
    if not _LETTERS.fullmatch(word):
        raise _NoParse("not a word")
    return word if word == gold else repr(list(word))


GRAMMARS: dict[str, Grammar] = {
    "countdown": arithmetic,
    "puzzle24": arithmetic,
    "binary_matrix": integer_matrix,
    "spiral_matrix": integer_row,
    "n_queens": queens_board,
    "string_insertion": letters,
}


def canonical_answer(family: str, answer: str, gold: str) -> str | None:
    """What the family's scorer may be handed for ``answer``: the canonical string of its grammar, the answer
    itself for a family whose scorer evaluates nothing, None when the answer does not parse or the family is
    refused (such answers score 0)."""
    if family in REFUSED:
        return None
    grammar = GRAMMARS.get(family)
    if grammar is None:
        return answer
    try:
        return grammar(answer, gold)
    except _NoParse:
        return None
