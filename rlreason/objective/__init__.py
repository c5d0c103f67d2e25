"""The objective: group-relative advantages and per-token losses as pure functions of tensors, and the ``Objective``
built from the config that chooses and composes them for the trainer."""
