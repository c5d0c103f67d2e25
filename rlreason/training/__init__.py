"""Training: the trainer (the one stateful piece, blind to the objective) and what it is built from: ``setup``
(accelerator, data, models), ``groups`` (sampling groups, dynamic sampling, model inputs, frozen passes),
``step_log`` (a step's metrics and completion rows, gathered across processes), ``checkpoint`` (the run
directory, save and resume), ``logprobs`` (the forward passes that give completions' log-probs), ``interrupt``
(Ctrl-C that always ends a run); the cold-start ``sft`` and ``distill``."""
