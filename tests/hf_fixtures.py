"""Tiny Hugging Face BitNet directories laid out like microsoft/bitnet-b1.58-2B-4T, for tests.

    make_2b4t_like_hf_dir(tmp_path / "hf")     config.json, model.safetensors (packed with transformers'
                                               own pack_weights), tokenizer.json, tokenizer_config.json,
                                               generation_config.json

The tokenizer is what makes the layout awkward, so it is built like LLaMA 3's: byte-level BPE with
LLaMA 3's Split regex + ByteLevel(use_regex=False), `ignore_merges`, the special tokens appended
after the learned vocabulary (<|begin_of_text|>, <|end_of_text|>, header tokens, <|eot_id|>), a
TemplateProcessing post-processor that prepends <|begin_of_text|>; tokenizer_config.json names
bos <|begin_of_text|> and eos <|eot_id|> and holds a LLaMA-3-style chat template;
generation_config.json lists both end tokens, [<|end_of_text|>, <|eot_id|>].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from bitnet158.interop.gguf_tokenizer import LLAMA3_SPLIT

BOS, EOT_TEXT, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIALS = (BOS, EOT_TEXT, HEADER_START, HEADER_END, EOT)  # LLaMA 3's order (ids 128000, 128001, 128006, ...)
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Sizes of the tiny model (2B4T: 2560, 30 layers, 20 heads, 5 kv heads, 6912, relu², tied).
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, MAX_POS = 64, 2, 4, 2, 128, 256
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Ternary weights take the values minus one, zero and plus one; one scale per tensor.",
    "def forward(self, x):\n    return self.down(self.act(self.up(x))) * self.scale\n",
    "User: what is the capital of France?\nAssistant: The capital of France is Paris.",
    "Numbers 12345 and 2025, punctuation!? (parentheses) [brackets] {braces} ok.",
    "naïve café, 中文文本, emoji 😀 and tabs\tand newlines\r\n in the middle of text.",
]


def llama3_like_tokenizer(learned_vocab: int = 340) -> HFTokenizer:
    """A `tokenizers` object shaped like LLaMA 3's: `learned_vocab` byte-level BPE tokens, then
    the five special tokens."""
    backend = HFTokenizer(models.BPE(ignore_merges=True))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=learned_vocab, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 10, trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    return backend


def _packed_tensors(vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """model.safetensors of a packed autobitlinear BitNetForCausalLM: linear weights as transformers'
    pack_weights writes them (uint8, 4 codes per byte along the output dimension) with a bf16
    weight_scale (mean|W|, a dequantization multiplier), bf16 embedding and norms, tied head."""
    from transformers.integrations.bitnet import pack_weights

    g = torch.Generator().manual_seed(seed)
    head_dim = HIDDEN // HEADS
    kv = KV_HEADS * head_dim
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (kv, HIDDEN),
              "self_attn.v_proj": (kv, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
              "mlp.down_proj": (HIDDEN, INTERMEDIATE)}
    norms = {"input_layernorm": HIDDEN, "post_attention_layernorm": HIDDEN,
             "self_attn.attn_sub_norm": HIDDEN, "mlp.ffn_sub_norm": INTERMEDIATE}

    def gains(n: int) -> torch.Tensor:  # away from 1, so a norm that is skipped would show
        return (0.5 + torch.rand(n, generator=g)).to(torch.bfloat16)

    tensors = {"model.embed_tokens.weight": torch.randn(vocab_size, HIDDEN, generator=g).to(torch.bfloat16),
               "model.norm.weight": gains(HIDDEN)}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}"
        for name, shape in shapes.items():
            codes = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)
            tensors[f"{prefix}.{name}.weight"] = pack_weights(codes.clone())  # it adds 1 in place
            scale = 0.02 + 0.05 * torch.rand(1, generator=g)
            tensors[f"{prefix}.{name}.weight_scale"] = scale.to(torch.bfloat16)
        for name, n in norms.items():
            tensors[f"{prefix}.{name}.weight"] = gains(n)
    return tensors


def make_2b4t_like_hf_dir(path: Path, *, vocab_size: int | None = None, seed: int = 0,
                          add_bos_token: bool | None = True, chat_template_file: bool = False,
                          generation_config: bool = True) -> Path:
    """Write the directory (see the module docstring) and return `path`.

    vocab_size: the model's rows (default: the tokenizer's size; larger pads the embedding, as
    2B4T's 128256 rows do past LLaMA 3's special tokens). add_bos_token None leaves the key out,
    so only the post-processor says bos is added. chat_template_file puts the template in
    chat_template.jinja instead of tokenizer_config.json. generation_config False omits that file
    (then only <|eot_id|> and config.json's <|end_of_text|> say where text ends).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    backend = llama3_like_tokenizer()
    n_tokens = backend.get_vocab_size(with_added_tokens=True)
    vocab_size = vocab_size or n_tokens
    if vocab_size < n_tokens:
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {n_tokens} tokens")
    ids = {t: backend.token_to_id(t) for t in SPECIALS}
    backend.save(str(path / "tokenizer.json"))

    config = {
        "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": vocab_size,
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "hidden_act": "relu2",
        "max_position_embeddings": MAX_POS, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16",
        "bos_token_id": ids[BOS], "eos_token_id": ids[EOT_TEXT],  # config.json names only one end
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "offline"},
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    save_file(_packed_tensors(vocab_size, seed), str(path / "model.safetensors"), metadata={"format": "pt"})

    tc = {
        "added_tokens_decoder": {str(ids[t]): {"content": t, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": True}
                                 for t in SPECIALS},
        "bos_token": BOS, "eos_token": EOT, "clean_up_tokenization_spaces": True,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": MAX_POS,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if add_bos_token is not None:
        tc["add_bos_token"] = add_bos_token
    if chat_template_file:
        (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    else:
        tc["chat_template"] = CHAT_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False))
    if generation_config:
        gen = {"bos_token_id": ids[BOS], "eos_token_id": [ids[EOT_TEXT], ids[EOT]], "do_sample": True,
               "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.52.0"}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


def write_converter_style_gguf(path: Path, hf_dir: Path, vocab_size: int | None = None) -> Path:
    """A GGUF holding only `hf_dir`'s tokenizer keys, written as llama.cpp's convert_hf_to_gguf
    writes a LLaMA 3 vocabulary (tokens from the HF tokenizer, added special tokens CONTROL,
    pre "llama-bpe", bos/eos/add_bos/template/merges by gguf-py's own SpecialVocab) — an
    independent writer to test our reader against."""
    import gguf
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    vocab = hf_tok.get_vocab()
    n = vocab_size or len(vocab)
    reverse = {i: t for t, i in vocab.items()}
    added = hf_tok.get_added_vocab()
    tokens, types = [], []
    for i in range(n):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif reverse[i] in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if hf_tok.added_tokens_decoder[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=n).add_to_gguf(writer, quiet=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
