"""The torch-free runtime (`bitnet158.runtime`): a packed directory run on the compiled step alone.

Its logits are the torch path's bit for bit (quantized heads; float heads within float rounding),
so greedy tokens match; the batching engine, chat and the server run it unchanged; a forged file is
refused in one line; and in a virtual environment that has no torch at all, `generate`, `chat` and
`serve` run and give the torch path's greedy output.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from common import one_line
from packaging.requirements import Requirement

import bitnet158 as bn
from bitnet158 import native, runtime
from bitnet158.errors import CheckpointError, ConfigError
from bitnet158.generate import GenerationRequest, PromptCache, generate, generate_step
from bitnet158.runner import set_kv_dtype
from bitnet158.pack import pack_
from bitnet158.packed_layers import PackConfig
from bitnet158.sampling import SamplingConfig
from bitnet158.serve.engine import Engine
from bitnet158.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not native.extension_available(), reason="the runtime needs the compiled extension")

GREEDY = SamplingConfig(temperature=0.0)
TEXT = "def f(x):\n    return x * 2\n\nfor i in range(10):\n    print(f(i))\n"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([TEXT] * 30, vocab_size=300)


def _trained(tokenizer: Tokenizer, **overrides) -> bn.Transformer:
    """A tiny model trained briefly on TEXT, so greedy choices have margins."""
    torch.manual_seed(0)
    cfg = bn.preset("tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                    vocab_size=tokenizer.vocab_size, max_seq_len=128, **overrides)
    model = bn.Transformer(cfg)
    ids = torch.tensor(tokenizer.encode(TEXT * 20))
    data = torch.stack([ids[i:i + 33] for i in range(0, 64, 8)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(data[:, :-1]).reshape(-1, cfg.vocab_size),
                                                 data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


VARIANTS = {
    "i2-int8-tied": ({}, PackConfig(format="i2", head="int8")),
    "base3-q4-tied": ({}, PackConfig(format="base3", head="q4")),
    "lut2-int8-untied": ({"tie_embeddings": False}, PackConfig(format="lut2", head="int8")),
    "i2-fp16-untied-relu2": ({"tie_embeddings": False, "activation": "relu2"}, PackConfig(format="i2", head="fp16")),
    "base3-fp32-inner-bias": ({"norm_placement": "inner", "qkv_bias": True}, PackConfig(format="base3", head="fp32")),
}


@pytest.fixture(scope="module")
def packed_dirs(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packed")
    out = {}
    for name, (overrides, packing) in VARIANTS.items():
        model = _trained(tokenizer, **overrides)
        pack_(model, packing)
        bn.save_packed(model, root / name, tokenizer)
        out[name] = root / name
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_greedy_tokens_equal_the_torch_path(packed_dirs, tokenizer, variant):
    native_model, native_tok = runtime.load(packed_dirs[variant])
    torch_model, _ = bn.load(packed_dirs[variant])
    prompt = tokenizer.encode("def f(x):")
    ours = PromptCache(native_model).prefill(native_model, prompt, all_logits=True)
    theirs = PromptCache(torch_model).prefill(torch_model, prompt, all_logits=True)
    assert ours.shape == (len(prompt), tokenizer.vocab_size) and ours.dtype == np.float32
    if VARIANTS[variant][1].head in ("int8", "q4"):  # the whole step is the same native code
        assert np.array_equal(ours, theirs)
    else:  # the float head's matmul: numpy's BLAS here, torch's there
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    want = list(generate_step(torch_model, prompt, GREEDY, 40))
    assert list(generate_step(native_model, prompt, GREEDY, 40)) == want
    assert native_tok.encode(TEXT) == tokenizer.encode(TEXT)


def test_an_fp16_kv_cache_runs_the_same_on_both_paths(packed_dirs, tokenizer):
    native_model, _ = runtime.load(packed_dirs["i2-int8-tied"])
    torch_model, _ = bn.load(packed_dirs["i2-int8-tied"])
    for model in (native_model, torch_model):
        set_kv_dtype(model, "fp16")
    prompt = tokenizer.encode("def f(x):")
    caches = [PromptCache(m) for m in (native_model, torch_model)]
    assert caches[0].kv.keys[0].dtype == np.float16 and caches[1].kv.keys[0].dtype == torch.float16
    ours, theirs = (c.prefill(m, prompt, all_logits=True) for c, m in zip(caches, (native_model, torch_model)))
    assert np.array_equal(ours, theirs)  # the same native step over the same fp16 bytes
    assert list(generate_step(native_model, prompt, GREEDY, 40)) == list(generate_step(torch_model, prompt, GREEDY, 40))


def test_the_runtime_never_imports_torch(packed_dirs):
    """In a fresh interpreter, loading and generating leaves torch unimported."""
    code = ("import sys\nfrom bitnet158 import runtime\nfrom bitnet158.generate import generate\n"
            f"m, t = runtime.load({str(packed_dirs['i2-int8-tied'])!r})\n"
            "generate(m, t, 'def', 5, seed=1)\nimport bitnet158.serve.engine, bitnet158.cli.chat\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_the_batching_engine_runs_the_runtime_model(packed_dirs, tokenizer):
    """Concurrent greedy requests, one batched forward per step: each equals its lone output."""
    model, _ = runtime.load(packed_dirs["i2-int8-tied"])
    prompts = [tokenizer.encode(p) for p in ("def f(x):", "for i in", "    print(", "return x")]
    alone = [list(generate_step(model, p, GREEDY, 12)) for p in prompts]
    engine = Engine(model, tokenizer, max_concurrency=4).start()
    try:
        streams = [engine.submit(GenerationRequest(tuple(p), max_tokens=12, sampling=GREEDY)) for p in prompts]
        got = [[r.token for r in s] for s in streams]
    finally:
        engine.shutdown()
    for g, a in zip(got, alone):  # the engine also stops at an end token, generate_step does not
        assert g == a[:len(g)] and (len(g) == 12 or g[-1] in tokenizer.end_ids)
    assert max(engine.batch_sizes) > 1  # decode steps really carried several sequences


def test_seeded_sampling_is_the_same_on_both_paths(packed_dirs, tokenizer):
    warm = SamplingConfig(temperature=0.9, top_p=0.95, repetition_penalty=1.1)
    native_model, _ = runtime.load(packed_dirs["base3-q4-tied"])
    torch_model, _ = bn.load(packed_dirs["base3-q4-tied"])
    assert generate(native_model, tokenizer, "def", 30, warm, seed=7) == generate(torch_model, tokenizer, "def", 30,
                                                                                 warm, seed=7)


# ----- hostile input: one line each -----------------------------------------------------------
def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of packed directory `src` whose tensors went through `edit(dict) -> dict`."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(edit(load_file(src / "model.safetensors")), dst / "model.safetensors")
    return dst


def _set(name: str, value):
    def edit(tensors):
        tensors[name] = value(tensors[name])
        return tensors
    return edit


@pytest.mark.parametrize("edit, fragments", [
    (_set("norm.weight", lambda t: t * np.nan), ("norm.weight", "NaN")),
    (_set("layers.0.self_attn.q_proj.weight_scale", lambda t: -t), ("q_proj.weight_scale", "non-positive")),
    (_set("layers.1.mlp.up_proj.weight_scale", lambda t: t * 1e9), ("up_proj.weight_scale", "above the bound")),
    (_set("layers.0.mlp.down_proj.packed", lambda t: np.full_like(t, 0xFF)), ("down_proj.packed",)),
    (_set("norm.weight", lambda t: t[:-1].copy()), ("norm.weight", "shape")),
    (_set("embed_tokens.table.row_scale", lambda t: t.astype(np.float16)), ("row_scale", "dtype")),
    (lambda t: {k: v for k, v in t.items() if k != "layers.1.self_attn.o_proj.packed"}, ("o_proj.packed", "missing")),
    (lambda t: {**t, "extra.weight": np.zeros(3, np.float32)}, ("extra.weight", "unexpected")),
])
def test_a_forged_file_is_refused_in_one_line(packed_dirs, tmp_path, edit, fragments):
    bad = _rewrite(packed_dirs["i2-int8-tied"], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as info:
        runtime.load(bad)
    one_line(info.value, *fragments)


def test_a_truncated_file_and_a_training_form_directory_are_refused(packed_dirs, tmp_path, tokenizer):
    cut = _rewrite(packed_dirs["i2-int8-tied"], tmp_path / "cut", lambda t: t)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        runtime.load(cut)
    one_line(info.value, "model.safetensors")
    latent = tmp_path / "latent"
    bn.save(_trained(tokenizer), latent, tokenizer)
    with pytest.raises(CheckpointError) as info:
        runtime.load(latent)
    one_line(info.value, "not a packed model", "bitnet158 pack")


def test_runtime_choice(monkeypatch):
    assert runtime.choose("native") == "native" and runtime.choose("torch") == "torch"
    assert runtime.choose(None) == "torch"  # torch is installed here
    monkeypatch.setenv(runtime.ENV_RUNTIME, "native")
    assert runtime.choose(None) == "native"
    with pytest.raises(ConfigError) as info:
        runtime.choose("jax")
    one_line(info.value, "jax")


# ----- a virtual environment without torch ------------------------------------------------------
def _needed(requirements: list[str] | None) -> list[str]:
    """The distributions a requirement list installs here: no extras, markers evaluated."""
    names = []
    for text in requirements or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            names.append(requirement.name.lower().replace("_", "-"))
    return names


def _minimal_install() -> list[Path]:
    """What `pip install bitnet158` (no extras) installs besides bitnet158 itself: its base
    requirements and theirs, as the top-level paths in site-packages each distribution owns."""
    names, todo = set(), _needed(metadata.requires("bitnet158"))
    while todo:
        name = todo.pop()
        if name in names:
            continue
        names.add(name)
        todo += _needed(metadata.requires(name))
    assert "torch" not in names, "the minimal install must not depend on torch"
    paths = set()
    for name in names:
        dist = metadata.distribution(name)
        for file in dist.files or []:
            top = file.parts[0]
            if top != ".." and not top.endswith((".dist-info", ".pth")) and top != "__pycache__":
                paths.add(Path(dist.locate_file(top)))
    return sorted(paths)


@pytest.fixture(scope="module")
def torch_free_python(tmp_path_factory) -> Path:
    """A virtual environment holding bitnet158 and only what its torch-free verbs import (no torch)."""
    venv = tmp_path_factory.mktemp("torch-free") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    for path in _minimal_install():
        (site / path.name).symlink_to(path)
    (site / "bitnet158.pth").write_text(str(Path(bn.__file__).parent.parent) + "\n")
    check = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert check.returncode != 0 and "No module named 'torch'" in check.stderr
    return python


def _run(python: Path, *args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "BITNET158_RUNTIME"))}
    return subprocess.run([str(python), "-m", "bitnet158", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd)


def test_generate_and_chat_without_torch_match_the_torch_path(torch_free_python, packed_dirs, tokenizer, tmp_path):
    ckpt = packed_dirs["i2-int8-tied"]
    torch_model, _ = bn.load(ckpt)
    want = generate(torch_model, tokenizer, "def f(x):", 30, GREEDY)
    out = _run(torch_free_python, "generate", str(ckpt), "--prompt", "def f(x):", "--max-tokens", "30",
               "--temperature", "0", "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == "def f(x):" + want + "\n"
    drafted = _run(torch_free_python, "generate", str(ckpt), "--prompt", "def f(x):", "--max-tokens", "30",
                   "--temperature", "0", "--speculate", "ngram", cwd=tmp_path)
    assert drafted.returncode == 0 and drafted.stdout == out.stdout, drafted.stderr[-2000:]  # exact: same tokens
    assert "drafts accepted" in drafted.stderr
    chat = _run(torch_free_python, "chat", str(ckpt), "--temperature", "0", "--max-tokens", "8",
                stdin="hello\n/reset\nagain\n/exit\n", cwd=tmp_path)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stderr.count("tok/s") == 2 and "[conversation cleared]" in chat.stderr
    info = _run(torch_free_python, "info", str(ckpt), cwd=tmp_path)  # headers only, no torch
    assert info.returncode == 0, info.stderr[-2000:]
    with_torch = subprocess.run([sys.executable, "-m", "bitnet158", "info", str(ckpt)], capture_output=True,
                                text=True, timeout=120)
    assert info.stdout == with_torch.stdout and "format i2, head int8" in info.stdout
    needs = _run(torch_free_python, "pack", str(ckpt), str(tmp_path / "x"), cwd=tmp_path)
    assert needs.returncode == 2 and "needs torch" in needs.stderr and "Traceback" not in needs.stderr
    adapter = _run(torch_free_python, "generate", str(ckpt), "--adapter", str(tmp_path), cwd=tmp_path)
    assert adapter.returncode == 2 and "--adapter needs the torch runtime" in adapter.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_without_torch_answers_as_the_torch_path(torch_free_python, packed_dirs, tokenizer, tmp_path):
    ckpt = packed_dirs["i2-int8-tied"]
    torch_model, _ = bn.load(ckpt)
    want = generate(torch_model, tokenizer, "for i in", 16, GREEDY)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "BITNET158_RUNTIME"))}
    server = subprocess.Popen([str(torch_free_python), "-m", "bitnet158", "serve", str(ckpt), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stdout.read()[-2000:]
            time.sleep(0.2)
        else:
            pytest.fail("the torch-free server never became healthy")
        body = {"model": ckpt.name, "prompt": "for i in", "max_tokens": 16, "temperature": 0}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert answer["choices"][0]["text"] == want
        assert httpx.get(url + "/metrics", timeout=10).status_code == 200
    finally:
        server.terminate()
        server.wait(30)
