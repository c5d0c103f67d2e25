"""rewards.answer_grammar: strict grammars for answers that reasoning-gym scorers evaluate, and the audit that
keeps its family table complete for the installed reasoning-gym."""

from __future__ import annotations

import inspect
import re
import sys

import pytest

from rewards.answer_grammar import GRAMMARS, REFUSED, canonical_answer, check_family

EVALUATES = re.compile(r"\beval\(|parse_expr|sympify|literal_eval|\bexec\(|parse_latex")
# Modules that evaluate text, but never the model's answer (read in reasoning-gym 0.1.25):
NOT_THE_ANSWER = {
    "number_sorting": "eval of entry['answer'] when it is not JSON",
    "bitwise_arithmetic": "eval of the generated problem in metadata",
    "basic_arithmetic": "eval while generating",
    "codeio": "exec while generating",
    "propositional_logic": "its own parse_expr, a recursive parser that runs nothing",
}


def test_every_module_that_evaluates_text_is_covered_refused_or_read():
    from reasoning_gym.factory import DATASETS

    evaluating = {name for name, (cls, _) in DATASETS.items()
                  if EVALUATES.search(inspect.getsource(sys.modules[cls.__module__]))}
    assert evaluating - set(NOT_THE_ANSWER) <= set(GRAMMARS) | set(REFUSED)


@pytest.mark.parametrize(
    ("family", "answer", "canonical"),
    [
        ("countdown", "94*4 - 61 - 6", "94 * 4 - 61 - 6"),
        ("countdown", " 42*(30 - 4 - 23) ", "42 * ( 30 - 4 - 23 )"),
        ("puzzle24", "-(9*3)*8/9", "- ( 9 * 3 ) * 8 / 9"),
        ("binary_matrix", "0  1\n\n1 0 ", "0 1\n1 0"),
        ("binary_matrix", "[[0,1], (1, 0)]", "[[0, 1], [1, 0]]"),
        ("spiral_matrix", "1 2\n3 -4", "1 2 3 -4"),
        ("spiral_matrix", "[1, 2, -3]", "[1, 2, -3]"),
        ("n_queens", "_ Q\nQ _", "_ Q\nQ _"),
        ("n_queens", "[['_', 'Q'], ['Q', '_']]", "[['_', 'Q'], ['Q', '_']]"),
        ("string_insertion", "ABCDE", "ABCDE"),
        ("string_insertion", "ABCDA", "['A', 'B', 'C', 'D', 'A']"),
        ("string_insertion", "['A', 'BC']", "['A', 'BC']"),
        ("knights_knaves", "__import__('os')", "__import__('os')"),  # its scorer evaluates nothing
    ],
)
def test_answers_in_the_grammar_become_canonical(family, answer, canonical):
    assert canonical_answer(family, answer, "ABCDE") == canonical


@pytest.mark.parametrize(
    ("family", "answer"),
    [
        ("countdown", "9**9"),
        ("countdown", "2^10"),
        ("countdown", "1.5 + 2"),
        ("countdown", "3 4"),
        ("countdown", "(1 + 2"),
        ("countdown", "1 + 2 = 3"),
        ("countdown", "-" * 3000 + "1"),
        ("countdown", "(" * 60 + "1" + ")" * 60),
        ("countdown", "x + 1"),
        ("countdown", "6 × 4"),
        ("countdown", ""),
        ("binary_matrix", "[[0, 1], [1, 0]] + [[1]]"),
        ("binary_matrix", "[[0, True]]"),
        ("binary_matrix", "[[0, len('a')]]"),
        ("binary_matrix", "0 one"),
        ("spiral_matrix", "[[1, 2]]"),
        ("spiral_matrix", "[1, 2][0]"),
        ("n_queens", "Q"),
        ("n_queens", "[['Q', __name__]]"),
        ("n_queens", "_ Q\nQ x"),
        ("string_insertion", "ABC DE"),
        ("string_insertion", "['A', 'B' * 3]"),
        ("string_insertion", "[().__class__]"),
        ("polynomial_multiplication", "x**2"),
    ],
)
def test_answers_outside_the_grammar_do_not_parse(family, answer):
    assert canonical_answer(family, answer, "ABCDE") is None


def test_refused_families_name_the_reason():
    with pytest.raises(ValueError, match="simple_integration: .*cannot be scored safely"):
        check_family("simple_integration")
    check_family("countdown")
