"""A SentencePiece `tokenizer.model` (LLaMA-2-family and 1bitLLM repos) as a `tokenizers` tokenizer.

    backend = sentencepiece_backend(Path("repo/tokenizer.model"))   # tokenizers.Tokenizer

The model file is SentencePiece's own protobuf, read with the `sentencepiece` package's schema
(`pip install 'bitnet158[sentencepiece]'`: sentencepiece + protobuf). A BPE model becomes what
SentencePiece computes, in `tokenizers` terms:
- the pieces in id order as a BPE vocabulary, with merges ranked by the merged piece's id (a BPE
  model's ids follow its merge order) and byte fallback kept (`<0x41>` pieces for unseen bytes);
- the normalizer: extra whitespace removed when the model says so, the dummy prefix "▁"
  prepended, spaces written as "▁";
- control pieces (<s>, </s>) and <unk> as special tokens, user-defined pieces as added tokens;
- a decoder that undoes it: "▁" → space, byte pieces → bytes, the dummy prefix stripped.
Unigram, word and char models are refused with a line saying so. tests/test_sentencepiece.py
checks the ids against SentencePiece's own encoder.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers
from tokenizers import Tokenizer as _HFTokenizer

from ..errors import CheckpointError, first_line

MAX_MODEL_BYTES = 64 << 20  # LLaMA-2's is 0.5 MB; the largest SentencePiece models are a few MB
SPACE = "▁"
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
_BPE = 2  # TrainerSpec.ModelType


def _read_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2 as schema
    except ImportError:
        raise CheckpointError(f"{path}: a SentencePiece tokenizer.model needs the sentencepiece and protobuf "
                              f"packages (pip install 'bitnet158[sentencepiece]'), or pass a tokenizer.json "
                              f"with --tokenizer") from None
    try:
        size = path.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise CheckpointError(f"{path}: {size:,} bytes is not a SentencePiece model (the limit is "
                                  f"{MAX_MODEL_BYTES:,})")
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or first_line(e)})") from None
    proto = schema.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError, or a RuntimeError from its C++ parser
        raise CheckpointError(f"{path}: not a SentencePiece model ({first_line(e)})") from None
    if not proto.pieces:
        raise CheckpointError(f"{path}: not a SentencePiece model (no pieces)")
    return proto


def _merges(vocab: dict[str, int], mergeable: set[str]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces of the vocabulary, ranked by the merged piece's id
    (then by the halves' ids): the order SentencePiece's BPE applies them."""
    ranked = []
    for piece in mergeable:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((vocab[piece], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_backend(path: Path) -> _HFTokenizer:
    """The `tokenizers` equivalent of a SentencePiece BPE model file; CheckpointError (one line)
    for anything else."""
    path = Path(path)
    proto = _read_proto(path)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != _BPE:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(spec.model_type, str(spec.model_type))
        raise CheckpointError(f"{path}: a SentencePiece {kind} model; only BPE models (LLaMA-2, 1bitLLM) "
                              f"convert — pass a tokenizer.json with --tokenizer")
    vocab: dict[str, int] = {}
    for i, p in enumerate(proto.pieces):
        if p.piece in vocab:
            raise CheckpointError(f"{path}: piece {p.piece!r} appears twice (ids {vocab[p.piece]} and {i})")
        vocab[p.piece] = i
    if not 0 <= spec.unk_id < len(proto.pieces):
        raise CheckpointError(f"{path}: unk_id {spec.unk_id} is outside the {len(proto.pieces)} pieces")
    mergeable = {p.piece for p in proto.pieces if p.type in (_NORMAL, _USER_DEFINED)}
    backend = _HFTokenizer(models.BPE(vocab, _merges(vocab, mergeable), unk_token=proto.pieces[spec.unk_id].piece,
                                      fuse_unk=True, byte_fallback=spec.byte_fallback))
    steps = []
    if norm.precompiled_charsmap:  # nmt_nfkc and friends: SentencePiece's own normalization table
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    undo = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        undo.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(undo)
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)])
    backend.add_tokens([AddedToken(p.piece, normalized=False) for p in proto.pieces if p.type == _USER_DEFINED])
    return backend
