"""Training: the plan (scratch, champion or skip), the recipe in named phases, its fast path
(packed varlen attention, fused chunked loss, compiled layers), checkpoints and the launcher."""
