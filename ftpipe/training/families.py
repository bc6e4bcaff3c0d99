"""Random-initialised checkpoints of real model families, for trying the pipeline (and testing
it) at the details that break pipelines, with no download: Qwen2 (tied embeddings,
grouped-query attention, a chat template that adds a system turn, no BOS) and Llama 3
(untied output layer, GQA, no pad token, header-style chat template), saved as sharded
safetensors with an index when asked.

    python -m ftpipe.training.families qwen2 models/qwen2-tiny
    python -m ftpipe.training.families qwen2 models/qwen25-05b --shape qwen2.5-0.5b --shard 500MB

The tokenizer is a small byte-level BPE trained on the embedded corpus with each family's
special tokens and chat template; the model's vocabulary is as large as the shape says
(151,936 for Qwen2.5-0.5B), so weights and memory are the real ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# real configurations (from the models' config.json) and tiny ones of the same family
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5),
    "qwen2-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=384, tie_word_embeddings=True,
                       max_position_embeddings=1024, rope_theta=1000000.0),
    "llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=384, tie_word_embeddings=False,
                       max_position_embeddings=1024, rope_theta=500000.0),
}

QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
LLAMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
FAMILIES = {
    # Qwen2: no BOS, pad = <|endoftext|>, a turn ends with <|im_end|>
    "qwen2": dict(arch="Qwen2", special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None,
                  eos="<|im_end|>", pad="<|endoftext|>", template=QWEN_TEMPLATE, shape="qwen2-tiny"),
    # Llama 3: BOS on every text, no pad token, a turn ends with <|eot_id|>
    "llama": dict(arch="Llama", special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                         "<|end_header_id|>", "<|eot_id|>"], bos="<|begin_of_text|>",
                  eos="<|eot_id|>", pad=None, template=LLAMA_TEMPLATE, shape="llama-tiny"),
}


def _corpus() -> list[str]:
    path = Path(__file__).resolve().parents[2] / "data" / "corpus" / "corpus.jsonl"
    if not path.is_file():
        return ["Convert 1991-03-13 to words. March 13, 1991"] * 10
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def family_tokenizer(family: str, vocab_size: int = 320):
    """A byte-level BPE (digits split, as the default's) with the family's special tokens,
    BOS behaviour, pad token (or none) and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    f = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=f["special"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if f["bos"]:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{f['bos']} $A", pair=f"{f['bos']} $A $B", special_tokens=[(f["bos"], tok.token_to_id(f["bos"]))])
    kwargs = {k: f[k] for k in ("bos", "eos", "pad") if f[k]}
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=f["template"], model_max_length=1024,
                                   **{f"{k}_token": v for k, v in kwargs.items()})


def random_model(family: str, dest: str | Path, shape: str | None = None, shard: str | None = None,
                 dtype: str = "float32", seed: int = 0) -> Path:
    """Save a random-initialised model of `family` ("qwen2" or "llama") at `shape` (a name in
    SHAPES; default the family's tiny one) with its tokenizer to dest; `shard` (e.g. "200KB",
    "500MB") splits the safetensors into shards with an index."""
    import torch
    import transformers

    f = FAMILIES[family]
    tok = family_tokenizer(family)
    dims = dict(SHAPES[shape or f["shape"]])
    dims["vocab_size"] = max(dims["vocab_size"], len(tok))
    config = getattr(transformers, f"{f['arch']}Config")(
        **dims, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = getattr(transformers, f"{f['arch']}ForCausalLM")(config).to(getattr(torch, dtype))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(dest, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", choices=sorted(FAMILIES))
    ap.add_argument("dest", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--shard", default=None, help="largest safetensors shard, e.g. 500MB (default: one file)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    path = random_model(args.family, args.dest, args.shape, args.shard, args.dtype)
    print(f"saved a random {args.family} ({args.shape or FAMILIES[args.family]['shape']}) to {path}")


if __name__ == "__main__":
    main()
