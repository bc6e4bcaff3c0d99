"""Loading a checkpoint for evaluation and greedy generation: batched, left-padded,
KV-cached, longest prompts first; on a GPU through a lean decode loop (`generate_fast`).
"""

from __future__ import annotations



def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
             sampling: dict | None = None) -> list[str]:
    """Greedy completions of raw prompt strings, in order. On a GPU: length-sorted batches
    filled to a token budget, one decode loop without generate()'s per-step machinery, and
    rows that finished leave the batch (`generate_fast`). On CPU: `model.generate` in
    batches of batch_size (`generate_reference`). sampling ({temperature, top_p, seed}): sampled
    instead, through `model.generate` on any device, the generator seeded so a run repeats."""
    if sampling is None and next(model.parameters()).device.type == "cuda":
        return generate_fast(model, tokenizer, prompts, max_new_tokens)
    return generate_reference(model, tokenizer, prompts, max_new_tokens, batch_size, sampling)


def generate_reference(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
                       sampling: dict | None = None) -> list[str]:
    """`model.generate` (greedy, KV-cached; sampled with sampling) on left-padded batches,
    longest prompts first."""
    import contextlib

    import torch

    how = {"do_sample": False} if sampling is None else {
        "do_sample": True, "temperature": sampling["temperature"], "top_p": sampling["top_p"], "top_k": 0}
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    model.eval()
    # Longest prompts first: batches of similar length waste less padding.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    done: dict[int, str] = {}
    # sampled: a seeded generator of its own (the caller's RNG untouched)
    rng = contextlib.nullcontext() if sampling is None else \
        torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
    with rng, torch.no_grad():
        if sampling is not None:
            torch.manual_seed(sampling["seed"])
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            enc = tokenizer([prompts[j] for j in idx], return_tensors="pt", padding=True,
                            add_special_tokens=True).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, **how, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            new = gen[:, enc["input_ids"].shape[1]:]
            for j, text in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True)):
                done[j] = text.strip()
    return [done[j] for j in range(len(prompts))]


def generate_fast(model, tokenizer, prompts: list[str], max_new_tokens: int, max_rows: int = 512,
                  max_batch_tokens: int | None = None, return_ids: bool = False, static: bool | None = None):
    """Greedy decoding as `model.generate` does it (left padding, positions from the mask, the
    same KV cache), for evaluation at GPU speed: prompts sorted by token length and batched up
    to max_rows rows and max_batch_tokens (prompt + new) tokens (default: what half the free
    GPU memory holds, at most 256k: on an H200 at the 1B shape 256k and 512 rows gave 11.8k
    new tokens/s, 341k and 1,024 rows 9.3k, `token_budget`); the prefill keeps only the
    last position's logits; each step is one forward of the live rows, and a row that emitted
    an end-of-sequence token leaves the batch (its cache rows dropped). return_ids: the new
    token ids per prompt instead of text.

    static (default: on a GPU): after the prefill, the batch decodes into a fixed-size cache
    with one CUDA graph per batch replayed for every step (`_decode_static`): no per-step
    launch work or cache growth; finished rows stay in the batch (their extra tokens are cut)
    and the batch stops when every row has finished."""
    model.eval()
    if static is None:
        static = next(model.parameters()).device.type == "cuda"
    with _decode_attention(model):
        return _generate_fast(model, tokenizer, prompts, max_new_tokens, max_rows, max_batch_tokens, return_ids,
                              static)


def _right_padded_prefill(model):
    """(decoder, output layer) where a batch's prompts may be padded on the right for the
    prefill, else None. Padded on the right, causal attention needs no mask (a real token never
    sees the pads after it), so SDPA runs its flash kernel instead of the masked one (the prefill's attention took 0.64 of 4.4 s on an H200
    with left padding), and each row's next-token logits come from its last real position
    (the decoder's hidden state there through the output layer). The pads' cache entries stay
    masked in every decode step. Only for models whose logits are exactly the output layer of
    the decoder's last hidden state (no soft-capping or logit scale)."""
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if (decoder is not None and decoder is not model and head is not None
            and getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager", GQA_DECODE)
            and not any(getattr(c, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))):
        return decoder, head
    return None


def token_budget(model, share: float = 0.5, cap: int = 256 * 1024) -> int:
    """How many (prompt + new) tokens a generate_fast batch may hold: `share` of the free GPU
    memory over a token's bytes (its KV cache, and the prefill's transient activations), at
    most `cap`. 64k on CPU."""
    import torch

    device = next(model.parameters()).device
    if device.type != "cuda":
        return 64 * 1024
    c = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    size = next(model.parameters()).element_size()
    kv = 2 * c.num_hidden_layers * getattr(c, "num_key_value_heads", heads) * head_dim * size
    transient = (3 * getattr(c, "intermediate_size", 4 * c.hidden_size) + 4 * c.hidden_size) * size
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(4096, min(cap, share * free // (kv + transient))))


def _generate_fast(model, tokenizer, prompts, max_new_tokens, max_rows, max_batch_tokens, return_ids,
                   static=False):
    import torch
    from transformers import DynamicCache

    device = next(model.parameters()).device
    max_batch_tokens = max_batch_tokens or token_budget(model)
    eos = tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, list) else [tokenizer.eos_token_id]
    eos_ids = torch.tensor([e for e in eos if e is not None] or [-1], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0].item()
    ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    batches, cur = [], []
    for i in order:   # the first row of a batch is its longest
        if cur and (len(cur) >= max_rows or (len(cur) + 1) * (len(ids[cur[0]]) + max_new_tokens) > max_batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    out: dict[int, list[int]] = {}
    cache_arg = _cache_arg(model)
    right = _right_padded_prefill(model)
    with torch.inference_mode():
        for rows in batches:
            width = len(ids[rows[0]])
            x = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                span = slice(0, len(ids[i])) if right else slice(width - len(ids[i]), width)
                x[r, span] = torch.tensor(ids[i])
                mask[r, span] = 1
            x, mask = x.to(device), mask.to(device)
            cache = DynamicCache()
            if right:
                pos = torch.arange(width, device=device).expand(len(rows), width)
                last = mask.sum(-1) - 1
                decoder, head = right
                hidden = decoder(input_ids=x, position_ids=pos, **{cache_arg: cache}, use_cache=True).last_hidden_state
                logits = head(hidden[torch.arange(len(rows), device=device), last])
            else:
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                last = pos[:, -1]
                logits = model(input_ids=x, attention_mask=mask, position_ids=pos, **{cache_arg: cache},
                               use_cache=True, logits_to_keep=1).logits[:, -1]
            if static:
                tokens = _decode_static(model, cache_arg, cache, logits, mask, last, max_new_tokens, eos_ids)
                for r, i in enumerate(rows):
                    out[i] = tokens[r]
                continue
            live = torch.arange(len(rows), device=device)
            steps: list[tuple[torch.Tensor, torch.Tensor]] = []
            for step in range(max_new_tokens):
                nxt = logits.argmax(-1)
                steps.append((live, nxt))
                if step == max_new_tokens - 1:
                    break
                going = ~torch.isin(nxt, eos_ids)
                if not bool(going.all()):
                    if not bool(going.any()):
                        break
                    keep = going.nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    live, nxt, mask, last = live[keep], nxt[keep], mask[keep], last[keep]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
                last = last + 1
                logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
                               **{cache_arg: cache}, use_cache=True).logits[:, -1]
            tokens = [[] for _ in rows]
            for live_rows, nxt in ((a.tolist(), b.tolist()) for a, b in steps):
                for r, t in zip(live_rows, nxt):
                    tokens[r].append(t)
            for r, i in enumerate(rows):
                out[i] = tokens[r]
    if return_ids:
        return [out[i] for i in range(len(prompts))]
    return [tokenizer.decode(out[i], skip_special_tokens=True).strip() for i in range(len(prompts))]


class _StaticKV:
    """A decode's KV cache of fixed size: per layer [B, Hkv, T, D] buffers, each step's keys
    and values written at `pos` (a one-element tensor on the device, advanced by the step
    itself), so one captured CUDA graph of the step serves every step. What the decoder
    layers call on a cache (`update`) and what the model asks of it."""

    is_compileable = False

    def __init__(self, keys: list, values: list, pos):
        self.keys, self.values, self.pos = keys, values, pos

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.keys[layer_idx].index_copy_(2, self.pos, key_states)
        self.values[layer_idx].index_copy_(2, self.pos, value_states)
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[0].shape[2]

    def __len__(self) -> int:
        return len(self.keys)


def _cache_arg(model) -> str:
    """The forward's name for the KV cache: `cache` from transformers 5.2x on, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _decode_static(model, cache_arg: str, cache, logits, mask, last, max_new_tokens: int,
                   eos_ids) -> list[list[int]]:
    """Greedy decoding of one prefilled batch into a fixed-size cache: the prompt's keys and
    values (cache, a DynamicCache after the prefill) copied into buffers of prompt + new
    length, an additive mask that opens each new position as it is written, and every step
    (forward, argmax, the buffers advanced) one CUDA graph replayed on a GPU (eager on CPU).
    Each row's tokens up to and including its first end-of-sequence token, as generate()
    returns them. Checks every 8 steps whether all rows have finished."""
    import torch

    rows, width = mask.shape
    total = width + max_new_tokens
    device, dtype = logits.device, next(model.parameters()).dtype
    keys, values = [], []
    for layer in cache.layers:
        for src, dst in ((layer.keys, keys), (layer.values, values)):
            buf = src.new_zeros(src.shape[:2] + (total, src.shape[-1]))
            buf[:, :, :width] = src
            dst.append(buf)
    del cache
    kv = _StaticKV(keys, values, torch.tensor([width], device=device))
    allowed = torch.full((rows, 1, 1, total), torch.finfo(dtype).min, dtype=dtype, device=device)
    allowed[:, 0, 0, :width].masked_fill_(mask.bool(), 0.0)
    first = logits.argmax(-1)
    tokens = torch.full((rows, max_new_tokens), -1, dtype=torch.long, device=device)
    tokens[:, 0] = first
    done = (first[:, None] == eos_ids).any(-1)
    ids, positions = first[:, None].clone(), (last + 1)[:, None].clone()
    at = torch.ones(1, dtype=torch.long, device=device)
    call = {"input_ids": ids, "attention_mask": allowed, "position_ids": positions, cache_arg: kv, "use_cache": True}

    def step():
        allowed.index_fill_(3, kv.pos, 0.0)
        nxt = model(**call).logits[:, -1].argmax(-1)
        tokens.index_copy_(1, at, nxt[:, None])
        done.logical_or_((nxt[:, None] == eos_ids).any(-1))
        ids.copy_(nxt[:, None])
        positions.add_(1)
        kv.pos.add_(1)
        at.add_(1)

    remaining = max_new_tokens - 1
    if remaining > 0 and not bool(done.all()):
        graph = None
        if device.type == "cuda":   # one eager step (warms cuBLAS and the allocator), then capture
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):   # recorded, not run: the step count is unchanged
                step()
        else:
            step()
        remaining -= 1
        for n in range(remaining):
            if n % 8 == 0 and bool(done.all()):
                break
            graph.replay() if graph is not None else step()
    out = []
    eos = set(eos_ids.tolist())
    for row in tokens.tolist():
        cut = []
        for t in row:
            if t < 0:
                break
            cut.append(t)
            if t in eos:
                break
        out.append(cut)
    return out


GQA_DECODE = "ftpipe_gqa_decode"


def _gqa_decode(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA for a decode step of a grouped-query model without copying the cache: the query
    heads that share a key/value head are folded into that head's query rows ([B, Hkv, G, D]
    against [B, Hkv, L, D]) instead of repeating K and V to every query head (repeat_kv, which
    copied the whole cache every step). Prefill (more than one query) is transformers' SDPA.
    (Two batched products with fp32 scores instead of SDPA's kernel measured 7% slower on an
    H200: RESULTS.md.)"""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, h, q, d = query.shape
    hkv = key.shape[1]
    if q != 1 or h == hkv:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    out = torch.nn.functional.scaled_dot_product_attention(
        query.reshape(b, hkv, h // hkv, d), key, value, attn_mask=mask, scale=scaling)
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


class _decode_attention:
    """generate_fast's attention on a GPU: the folded grouped-query decode (_gqa_decode) for
    models on SDPA, and SDPA without the cuDNN backend (it re-plans for every new cache
    length: ~3 ms of CPU per layer and step, measured on an H200). Restored on exit."""

    def __init__(self, model):
        self.model, self.before = model, getattr(model.config, "_attn_implementation", None)

    def __enter__(self):
        self.kernels = None
        if self.model.device.type != "cuda":
            return self
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self.kernels = sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
        self.kernels.__enter__()
        if self.before == "sdpa" and hasattr(self.model, "set_attn_implementation"):
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            AttentionInterface.register(GQA_DECODE, _gqa_decode)
            AttentionMaskInterface.register(GQA_DECODE, sdpa_mask)
            self.model.set_attn_implementation(GQA_DECODE)
        return self

    def __exit__(self, *exc):
        if self.kernels is not None:
            self.kernels.__exit__(*exc)
            if getattr(self.model.config, "_attn_implementation", None) == GQA_DECODE:
                self.model.set_attn_implementation(self.before)
        return False


def load_for_eval(model_dir: str, revision: str | None = None, trust_remote_code: bool = False,
                  allow_pickle_weights: bool = False, adapter: str | None = None):
    """(model, tokenizer) for scoring and generation: bf16 on a GPU, fp32 on CPU. With an
    adapter (a PEFT folder), model_dir is its base and the adapter is merged in (the
    tokenizer is the adapter's own when it has one)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    from ftpipe.training.models import tokenizer_dir

    tok_dir = tokenizer_dir(model_dir, adapter)
    tok = AutoTokenizer.from_pretrained(tok_dir, revision=None if tok_dir == adapter else revision,
                                        trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, revision=revision, dtype=dtype, use_safetensors=None if allow_pickle_weights else True,
        trust_remote_code=trust_remote_code,
        device_map={"": 0} if torch.cuda.is_available() else None)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model, tok
