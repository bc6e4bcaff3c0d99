"""Token batches of training and evaluation rows: encode (the completion labelled, the
prompt masked), collate (padded rows), pack (rows of max_seq_len, positions restarting per
example) and pack_flat (one unpadded row for varlen attention).
"""

from __future__ import annotations

from typing import Any

from ftpipe.data.formatting import completion_of, prompt_of

IGNORE_INDEX = -100


def encode(tokenizer, row: dict[str, Any], max_len: int,
           completion_only: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels; prompt tokens get IGNORE_INDEX when completion_only.

    The prompt is encoded with the tokenizer's own special tokens (BOS for Llama-style
    tokenizers), the completion without them, and EOS closes it so the model learns to stop.
    """
    prompt_ids = tokenizer(prompt_of(row, tokenizer))["input_ids"]
    completion_ids = tokenizer(completion_of(row, tokenizer), add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + completion_ids)[:max_len]
    prompt_labels = [IGNORE_INDEX] * len(prompt_ids) if completion_only else list(prompt_ids)
    labels = (prompt_labels + completion_ids)[:max_len]
    return ids, labels


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad a list of (ids, labels) into input_ids, attention_mask, labels tensors."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pack(batch: list[tuple[list[int], list[int]]], row_len: int, pad_id: int):
    """Lay examples end to end in rows of at most row_len tokens (first fit, in order).

    Position ids restart at 0 for every example; with no attention mask, transformers
    turns that into a block-diagonal causal mask (flash-attention varlen on GPU), so no
    token attends across examples. Each example's first label is IGNORE_INDEX so no
    example is trained to follow the one before it. The mean loss over labelled tokens is
    the padded batch's, minus the padding work. Also returns `lengths`: each token's own
    example length (NEFTune scales its noise by it).
    """
    import torch

    rows: list[list[tuple[list[int], list[int]]]] = []
    room: list[int] = []
    for ids, labels in batch:
        n = min(len(ids), row_len)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append((ids[:n], labels[:n]))
                room[r] -= n
                break
        else:
            rows.append([(ids[:n], labels[:n])])
            room.append(row_len - n)
    width = max(row_len - free for free in room)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels_t = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    lengths = torch.ones((len(rows), width), dtype=torch.long)
    for r, examples in enumerate(rows):
        at = 0
        for ids, lab in examples:
            n = len(ids)
            input_ids[r, at: at + n] = torch.tensor(ids)
            labels_t[r, at + 1: at + n] = torch.tensor(lab[1:])
            position_ids[r, at: at + n] = torch.arange(n)
            lengths[r, at: at + n] = n
            at += n
        if at < width:  # the tail is padding: its own "example", never labelled
            position_ids[r, at:] = torch.arange(width - at)
            lengths[r, at:] = width - at
    return {"input_ids": input_ids, "labels": labels_t, "position_ids": position_ids,
            "lengths": lengths, "real": torch.tensor(sum(len(ids) for row in rows for ids, _ in row))}


def pack_flat(batch: list[tuple[list[int], list[int]]], max_len: int):
    """All examples end to end in ONE row, no padding at all, with `cu_seq_lens` (the
    example boundaries) for varlen attention (ftpipe.training.loss). Each example's first label
    is masked, positions restart per example, `lengths` as in pack()."""
    import torch

    ids_all, labels_all, pos, lengths, bounds = [], [], [], [], [0]
    for ids, lab in batch:
        ids, lab = ids[:max_len], lab[:max_len]
        n = len(ids)
        ids_all.extend(ids)
        labels_all.extend([IGNORE_INDEX] + list(lab[1:]))
        pos.extend(range(n))
        lengths.extend([n] * n)
        bounds.append(bounds[-1] + n)
    t = lambda x: torch.tensor([x], dtype=torch.long)  # noqa: E731
    return {"input_ids": t(ids_all), "labels": t(labels_all), "position_ids": t(pos), "lengths": t(lengths),
            "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32),
            "max_length_q": max(b - a for a, b in zip(bounds[:-1], bounds[1:])),
            "real": torch.tensor(len(ids_all))}
