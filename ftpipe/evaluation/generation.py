"""Loading a checkpoint for evaluation and greedy generation: batched, left-padded,
KV-cached, longest prompts first.
"""

from __future__ import annotations


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions of raw prompt strings, in order (batched, KV-cached)."""
    import torch

    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    model.eval()
    # Longest prompts first: batches of similar length waste less padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    done: dict[int, str] = {}
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            enc = tokenizer([prompts[j] for j in idx], return_tensors="pt", padding=True,
                            add_special_tokens=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            for j, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                done[j] = text.strip()
    return [done[j] for j in range(len(prompts))]


def load_for_eval(model_dir: str, revision: str | None = None, trust_remote_code: bool = False,
                  allow_pickle_weights: bool = False):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    tok = AutoTokenizer.from_pretrained(model_dir, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, revision=revision, dtype=dtype, use_safetensors=None if allow_pickle_weights else True,
        trust_remote_code=trust_remote_code,
        device_map={"": 0} if torch.cuda.is_available() else None)
    return model, tok
