"""The objective: group-relative advantages and the per-token losses, pure functions of tensors."""
