"""Training: the trainer (the one stateful piece), the cold-start SFT, distillation, and the model forward
passes that give log-probs of completions."""
