"""GGUF export/import: exact round trips, what gguf-py's reader sees, refusals, and a fuzz of
truncated / corrupted / forged files that must all end in one line of our own error type."""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest
import torch

from bitnet158.config import ModelConfig
from bitnet158.errors import BitNetError, ConfigError, FormatError
from bitnet158.interop.gguf_export import export_gguf
from bitnet158.interop.gguf_import import load_gguf, read_gguf
from bitnet158.interop.gguf_header import read_header
from bitnet158.layers import BitLinear
from bitnet158.model import Transformer
from bitnet158.pack import pack_
from bitnet158.packed_layers import PackConfig, PackedBitLinear
from bitnet158.tokenizer import Tokenizer

# independent of the code under test: (values per block, bytes per block), from ggml-common.h
BLOCKS = {0: (1, 4), 1: (1, 2), 34: (256, 54), 35: (256, 66)}
FP16_REL = 2.0 ** -11  # fp16 rounding of a normal number


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["def f(x):\n    return x + 1\n", "hello world, the quick brown fox"] * 20, vocab_size=290)


def _model(tokenizer, ffn=320, layers=2, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=256, num_layers=layers, num_heads=4,
                      num_kv_heads=2, intermediate_size=ffn, max_seq_len=64, **kw)
    return Transformer(cfg).eval()


def _ternary_layers(model) -> dict[str, tuple[np.ndarray, float]]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, BitLinear):
            c, s = m.quantized_weight()
            out[name] = (c.numpy(), float(s))
        elif isinstance(m, PackedBitLinear):
            out[name] = (m.codes().numpy(), float(m.weight_scale))
    return out


@pytest.mark.parametrize("gtype", ["tq2_0", "tq1_0", "i2_s"])
def test_round_trip_codes_and_scales(tmp_path, tokenizer, gtype):
    model = _model(tokenizer)  # ffn 320: TQ export pads to 512, import un-pads
    path = tmp_path / f"m-{gtype}.gguf"
    report = export_gguf(model, path, gtype, tokenizer=tokenizer)
    back, tok = load_gguf(path)
    ours, theirs = _ternary_layers(model), _ternary_layers(back)
    assert ours.keys() == theirs.keys()
    worst = 0.0
    for name, (codes, scale) in ours.items():
        codes2, scale2 = theirs[name]
        assert np.array_equal(codes, codes2), name
        rel = abs(scale2 - scale) / scale
        worst = max(worst, rel)
        assert rel <= (FP16_REL if gtype != "i2_s" else 0.0), (name, scale, scale2)
    assert math.isclose(worst, report.max_scale_rel_error, rel_tol=1e-6, abs_tol=1e-12)
    assert report.ffn_padded_to == (512 if gtype != "i2_s" else None)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.allclose(p, back.get_submodule(name[:-len(".weight")]).weight, rtol=1e-6), name
    assert tok is not None and tok.encode("hello world, fox") == tokenizer.encode("hello world, fox")
    assert tok.eos_id == tokenizer.eos_id


def test_scale_tensors_are_exact_and_packed_input(tmp_path, tokenizer):
    model = _model(tokenizer, ffn=256)
    pack_(model, PackConfig(format="base3", head="fp16"))
    path = tmp_path / "m.gguf"
    report = export_gguf(model, path, "tq2_0", tokenizer=tokenizer, scale_tensors=True)
    assert report.max_scale_rel_error == 0.0 and report.ffn_padded_to is None
    back, _ = load_gguf(path)
    for name, (codes, scale) in _ternary_layers(model).items():
        codes2, scale2 = _ternary_layers(back)[name]
        assert np.array_equal(codes, codes2) and scale2 == pytest.approx(scale, rel=1e-7)
    x = torch.randint(0, tokenizer.vocab_size, (1, 12))
    with torch.no_grad():  # same codes, scales and fp16 head: the packed models agree
        assert torch.allclose(model(x), back(x), atol=1e-4)


@pytest.mark.parametrize("gtype", ["tq2_0", "tq1_0", "f16"])
def test_gguf_py_reads_what_we_write(tmp_path, tokenizer, gtype):
    from gguf import GGUFReader

    model = _model(tokenizer)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, gtype, tokenizer=tokenizer)
    reader = GGUFReader(path)
    kv = {f.name: f for f in reader.fields.values()}
    assert bytes(kv["general.architecture"].parts[-1]).decode() == "bitnet"
    assert bytes(kv["tokenizer.ggml.model"].parts[-1]).decode() == "gpt2"
    assert bytes(kv["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    ffn = 512 if gtype != "f16" else 320
    assert int(kv["bitnet.feed_forward_length"].parts[-1][0]) == ffn
    expect_type = {"tq2_0": 35, "tq1_0": 34, "f16": 1}[gtype]
    names = {t.name for t in reader.tensors}
    assert len(names) == 2 + 11 * 2 and "output.weight" not in names  # tied: no output tensor
    for t in reader.tensors:
        ne = [int(d) for d in t.shape]  # ggml order: ne0 = the row length
        if t.name == "token_embd.weight":
            want_type, want_ne = 1, [256, tokenizer.vocab_size]
        elif t.name.endswith("norm.weight"):
            want_type = 0
            want_ne = [ffn] if "ffn_sub_norm" in t.name else [256]
        else:
            stem = t.name.split(".")[2]
            want_type = expect_type
            want_ne = {"attn_q": [256, 256], "attn_k": [256, 128], "attn_v": [256, 128], "attn_output": [256, 256],
                       "ffn_gate": [256, ffn], "ffn_up": [256, ffn], "ffn_down": [ffn, 256]}[stem]
        assert int(t.tensor_type) == want_type, t.name
        assert ne == want_ne, t.name
        block, size = BLOCKS[want_type]
        assert int(t.n_bytes) == math.prod(want_ne) // block * size, t.name


def test_i2s_layout_and_size(tmp_path, tokenizer):
    model = _model(tokenizer, ffn=256, layers=1)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, "i2_s", tokenizer=tokenizer)
    header = read_header(path)
    entry = header.tensors["blk.0.attn_k.weight"]
    assert entry.ggml_type == 36 and entry.shape == (128, 256) and entry.nbytes == 128 * 256 // 4 + 32
    raw = path.read_bytes()[entry.offset:entry.offset + entry.nbytes]
    codes, scale = _ternary_layers(model)["layers.0.self_attn.k_proj"]
    flat = codes.reshape(-1)
    # byte k of block b: values 128b + k, +32, +64, +96 in bits 7-6, 5-4, 3-2, 1-0, code = value + 1
    for b, k in [(0, 0), (0, 31), (5, 17), (255, 31)]:
        byte = raw[32 * b + k]
        assert [(byte >> sh) & 3 for sh in (6, 4, 2, 0)] == [flat[128 * b + k + 32 * g] + 1 for g in range(4)]
    assert struct.unpack_from("<f", raw, 128 * 256 // 4)[0] == np.float32(scale)


def test_f16_import_exact_for_ternary_and_absmean_otherwise(tmp_path, tokenizer):
    model = _model(tokenizer, ffn=256, layers=1)
    path = tmp_path / "t.gguf"
    export_gguf(model, path, "f16", tokenizer=tokenizer)
    back, _, report = read_gguf(path)
    assert report.ternarized == ()
    for name, (codes, scale) in _ternary_layers(model).items():
        codes2, scale2 = _ternary_layers(back)[name]
        assert np.array_equal(codes, codes2) and abs(scale2 - scale) / scale <= FP16_REL
    fp = _model(tokenizer, ffn=256, layers=1, mode="fp")
    export_gguf(fp, tmp_path / "fp.gguf", "f16", tokenizer=tokenizer)
    assert len(read_gguf(tmp_path / "fp.gguf")[2].ternarized) == 7


@pytest.mark.parametrize("overrides,needle", [
    ({"activation": "relu2"}, "SiLU"), ({"tie_embeddings": False}, "untied"),
    ({"norm_placement": "inner"}, "SubLN"), ({"qkv_bias": True}, "biases"), ({"mode": "fp"}, "--type f16")])
def test_refusals_are_one_line(tmp_path, tokenizer, overrides, needle):
    with pytest.raises(ConfigError) as e:
        export_gguf(_model(tokenizer, ffn=256, layers=1, **overrides), tmp_path / "x.gguf", "tq2_0")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


def test_block_scales_that_differ_are_refused(tmp_path, tokenizer):
    model = _model(tokenizer, ffn=256, layers=1)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, "tq2_0", tokenizer=tokenizer)
    entry = read_header(path).tensors["blk.0.ffn_up.weight"]
    data = bytearray(path.read_bytes())
    d_at = entry.offset + 64  # block 0's fp16 d (the 66-byte block ends with it)
    d = np.frombuffer(bytes(data[d_at:d_at + 2]), np.float16)[0]
    data[d_at:d_at + 2] = np.float16(d * 2).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="blk.0.ffn_up.weight.*different scales"):
        load_gguf(path)


def test_cli_export_and_import(tmp_path, tokenizer, capsys):
    from bitnet158 import checkpoint
    from bitnet158.cli import main

    model = _model(tokenizer, ffn=256, layers=1)
    checkpoint.save(model, tmp_path / "ckpt", tokenizer)
    assert main(["export-gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf"), "--type", "tq1_0"]) == 0
    assert main(["export-gguf", str(tmp_path / "ckpt"), str(tmp_path / "m.gguf")]) == 2  # exists, no --force
    assert main(["import-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "packed")]) == 0
    loaded, tok = checkpoint.load(tmp_path / "packed")
    assert loaded.packing.format == "i2" and tok is not None
    for name, (codes, _) in _ternary_layers(model).items():
        assert np.array_equal(codes, _ternary_layers(loaded)[name][0])
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 40)
    assert main(["import-gguf", str(tmp_path / "junk.gguf"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("bitnet158: error:") for line in err)


# ---- fuzz -------------------------------------------------------------------------------------

def _field_offsets(data: bytes) -> tuple[list[int], list[int], int]:
    """Offsets of every u64 length/count field and u32 type field in the header, KV section and
    tensor infos (a walk written for the test, independent of the parser under test)."""
    u64, u32 = [8, 16], [4]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(p):
        u64.append(p)
        return p + 8 + struct.unpack_from("<Q", data, p)[0]

    for _ in range(n_kv):
        pos = string(pos)
        u32.append(pos)
        vtype = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if vtype == 8:
            pos = string(pos)
        elif vtype == 9:
            u32.append(pos)
            etype, count = struct.unpack_from("<IQ", data, pos)
            u64.append(pos + 4)
            pos += 12
            for _ in range(count):
                pos = string(pos) if etype == 8 else pos + sizes[etype]
        else:
            pos += sizes[vtype]
    for _ in range(n_tensors):
        pos = string(pos)
        u32.append(pos)
        n_dims = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        u64.extend(pos + 8 * i for i in range(n_dims))
        pos += 8 * n_dims
        u32.append(pos)
        u64.append(pos + 4)  # the data offset
        pos += 12
    return u64, u32, pos


def test_fuzz_corrupted_files_end_in_one_line_errors(tmp_path):
    tok = Tokenizer.train(["hello world " * 10] * 5, vocab_size=262)
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=256, num_layers=1, num_heads=2, num_kv_heads=1,
                      intermediate_size=256, max_seq_len=32)
    base_path = tmp_path / "base.gguf"
    export_gguf(Transformer(cfg), base_path, "tq2_0", tokenizer=tok)
    base = base_path.read_bytes()
    u64_fields, u32_fields, header_end = _field_offsets(base)
    rng = random.Random(1234)
    forged = [2 ** 64 - 1, 2 ** 63, 2 ** 62 + 7, 2 ** 32, 2 ** 32 - 1, len(base), len(base) + 1, 10 ** 12, 0]
    path = tmp_path / "case.gguf"
    outcomes = {"ok": 0, "error": 0}
    cases = 0

    def run(data: bytes, what: str) -> None:
        nonlocal cases
        cases += 1
        path.write_bytes(data)
        try:
            load_gguf(path)
            outcomes["ok"] += 1
        except BitNetError as e:
            msg = str(e)
            assert msg and "\n" not in msg, (what, msg)
            outcomes["error"] += 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{what}: {type(e).__name__}: {e}")

    for _ in range(650):  # truncations, most of them inside the header
        cut = rng.randrange(header_end + 64) if rng.random() < 0.8 else rng.randrange(len(base))
        run(base[:cut], f"truncated to {cut}")
    for _ in range(800):  # forged length / count / type fields
        data = bytearray(base)
        if rng.random() < 0.75:
            at = rng.choice(u64_fields)
            struct.pack_into("<Q", data, at, rng.choice(forged) if rng.random() < 0.7 else rng.getrandbits(64))
        else:
            at = rng.choice(u32_fields)
            struct.pack_into("<I", data, at, rng.choice([2 ** 32 - 1, 2 ** 31, 13, 64, 99, rng.getrandbits(32)]))
        run(bytes(data), f"forged field at {at}")
    for _ in range(500):  # byte flips in the header, KV section and tensor infos
        data = bytearray(base)
        spots = [rng.randrange(header_end) for _ in range(rng.choice([1, 1, 2, 4, 8]))]
        for at in spots:
            data[at] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        run(bytes(data), f"flipped {spots}")
    for _ in range(50):  # byte flips in the tensor data (codes, block scales, norms, embedding)
        data = bytearray(base)
        at = rng.randrange(header_end, len(base))
        data[at] = rng.randrange(256)
        run(bytes(data), f"data byte {at}")
    run(b"", "empty file")
    run(b"GGUF", "magic only")
    print(f"{cases} fuzz cases: {outcomes}")
    assert cases >= 2000
    assert outcomes["error"] > 1000 and outcomes["ok"] > 0


def test_ffn_padding_keeps_the_sub_norm_output(tmp_path, tokenizer):
    """TQ export pads FFN 320 → 512 with zero channels; the written sub-norm gain must make the
    padded RMSNorm give our output on the real channels (and zero on the padding)."""
    from gguf import GGUFReader

    model = _model(tokenizer, ffn=320, layers=1)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, "tq2_0", tokenizer=tokenizer)
    gain = next(np.array(t.data) for t in GGUFReader(path).tensors if t.name == "blk.0.ffn_sub_norm.weight")
    ours = model.layers[0].mlp.ffn_sub_norm
    x = torch.randn(3, 320)
    padded = torch.cat([x, torch.zeros(3, 192)], dim=1)
    theirs = padded * torch.rsqrt(padded.pow(2).mean(-1, keepdim=True) + ours.eps) * torch.from_numpy(gain)
    with torch.no_grad():
        assert torch.allclose(theirs[:, :320], ours(x), atol=1e-5) and not theirs[:, 320:].any()


def test_a_forged_key_name_cannot_split_the_error_message(tmp_path):
    """A key or tensor name is text from the file: one holding a newline (or U+2028) used to break
    the error over several lines."""
    import struct

    for key in ("evil\nkey", "evil\u2028key", "x" * 5000):
        raw = key.encode("utf-8")
        data = (b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 0) + struct.pack("<Q", 1)
                + struct.pack("<Q", len(raw)) + raw + struct.pack("<I", 99) + b"\0" * 64)
        path = tmp_path / "forged.gguf"
        path.write_bytes(data)
        with pytest.raises(FormatError) as e:
            read_header(path)
        message = str(e.value)
        assert len(message.splitlines()) == 1 and "unknown value type 99" in message and len(message) < 400
