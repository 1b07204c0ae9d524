"""Write a small llama-architecture GGUF model with random weights.

The model is real as far as llama.cpp is concerned: a llama tensor layout, a byte-fallback
SentencePiece vocabulary that can tokenize any text, and a chat template, so llama-server
serves completions, chat, embeddings and tokenization from it. The weights are random, so
the text is noise; tests ask for `ignore_eos` when they need an exact token count.

    python tests/support/make_model.py OUT.gguf [--dim 64 --layers 2 --f16 --split-tensors N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

WORDS = ["hello", "world", "the", "a", "gguf", "llama", "server", "token", "stream", "test"]


# Fill-in-the-middle control tokens, for /infill (llama-server refuses it without them).
FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


def vocabulary(fim: bool = False) -> tuple[list[bytes], list[float], list[int]]:
    """`<unk>`, `<s>`, `</s>`, the 256 byte tokens, a few whole words, then FIM tokens."""
    tokens: list[bytes] = [b"<unk>", b"<s>", b"</s>"]
    types = [
        gguf.TokenType.UNKNOWN,
        gguf.TokenType.CONTROL,
        gguf.TokenType.CONTROL,
    ]
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>".encode())
        types.append(gguf.TokenType.BYTE)
    for word in WORDS:
        tokens.append(("\u2581" + word).encode())
        types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * 259 + [-float(i) for i in range(len(WORDS))]
    if fim:
        for name in FIM_TOKENS:
            tokens.append(name.encode())
            types.append(gguf.TokenType.CONTROL)
            scores.append(0.0)
    return tokens, scores, [int(t) for t in types]


def write_model(
    path: Path,
    *,
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    ffn: int = 128,
    context: int = 4096,
    f16: bool = False,
    split_tensors: int = 0,
    seed: int = 0,
    chat_template: str = CHAT_TEMPLATE,
    fim: bool = False,
) -> list[Path]:
    """Write the model; returns the files written (several when split).

    ``fim``: add fill-in-the-middle tokens, so llama-server serves /infill.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tokens, scores, types = vocabulary(fim)
    dtype = np.float16 if f16 else np.float32

    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=split_tensors)
    writer.add_name(path.stem)
    writer.add_context_length(context)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(chat_template)
    if fim:
        first = len(tokens) - len(FIM_TOKENS)
        for offset, part in enumerate(("pre", "suf", "mid")):
            writer.add_uint32(f"tokenizer.ggml.fim_{part}_token_id", first + offset)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(dtype)

    def norm() -> np.ndarray:
        # Norm weights stay f32: llama.cpp expects them so for every file type.
        return np.ones(dim, dtype=np.float32)

    vocab = len(tokens)
    writer.add_tensor("token_embd.weight", weight(vocab, dim))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(dim, dim))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(dim, dim))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(dim, dim))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(dim, dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", norm())
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, dim))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, dim))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(dim, ffn))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(vocab, dim))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_tensors:
        return sorted(path.parent.glob(f"{path.stem}-*-of-*.gguf"))
    return [path]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--f16", action="store_true")
    parser.add_argument("--split-tensors", type=int, default=0)
    parser.add_argument("--fim", action="store_true", help="add fill-in-the-middle tokens")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    files = write_model(
        args.out,
        dim=args.dim,
        layers=args.layers,
        heads=args.heads,
        ffn=args.ffn,
        f16=args.f16,
        split_tensors=args.split_tensors,
        fim=args.fim,
    )
    for file in files:
        print(file)


if __name__ == "__main__":
    main()
