"""The rollout stage: engines that turn prompts into groups of completions behind one ``generate``.

``engine`` holds the interface (``Rollout``, ``SamplingParams``, ``RolloutEngine``) and the transformers engine;
``fast`` the static-cache engine with graphs and Triton kernels (``triton_decode``); ``sampling`` the seeded draw
both share.
"""
