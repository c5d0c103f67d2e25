"""The rollout stage: engines that turn prompts into groups of completions behind one ``generate``.

``engine`` holds the interface (``Rollout``, ``SamplingParams``, ``RolloutEngine``) and the transformers engine;
``fast`` the static-cache engine, built from ``fast_weights`` (the weights it computes with), ``fast_workspace``
(static buffers, a decode step's ``StepShape``, compaction), ``fast_ops`` (prefill, the draw, the PyTorch decode
step), ``fast_triton_step`` (the Triton decode step over ``triton_decode``'s kernels) and ``fast_graphs`` (CUDA
graph capture and replay); ``sampling`` the seeded draw both engines share.
"""
