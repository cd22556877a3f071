"""Data pipeline (train/data/): the default corpus split, bad inputs, file formats, batches, the
unigram floor."""

import hashlib
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from bitnet158.errors import DataError
from bitnet158.tokenizer import Tokenizer
from bitnet158.train.data import (
    Document,
    batch_for_step,
    default_corpus,
    encode_documents,
    eval_windows,
    is_heldout,
    load_corpus,
    tokenize_corpus,
    unigram_perplexity,
)


@pytest.fixture(scope="module")
def full():
    return default_corpus()


# ----- default corpus ----------------------------------------------------------------------------

def test_default_corpus_split_is_whole_files_and_fixed(full):
    train_names = [d.name for d in full.train]
    held_names = [d.name for d in full.heldout]
    assert train_names == sorted(train_names) and held_names == sorted(held_names)
    assert len(set(train_names)) == len(train_names)
    assert not set(train_names) & set(held_names)
    assert all(is_heldout(n) for n in held_names) and not any(is_heldout(n) for n in train_names)
    assert full.heldout and full.train
    assert 0.01 < full.heldout_bytes / (full.train_bytes + full.heldout_bytes) < 0.10
    # held-out documents are whole files, byte for byte
    root = Path(sysconfig.get_paths()["stdlib"])
    for doc in full.heldout:
        if doc.name.endswith(".py"):
            assert (root / doc.name).read_text(encoding="utf-8") == doc.text
    # no tests, no installed packages, no copy of the English topics, no generated codec tables
    assert not any("site-packages" in n or "/test/" in f"/{n}" or Path(n).name.startswith("test_")
                   for n in train_names + held_names)
    assert "pydoc_data/topics.py" not in train_names + held_names
    assert "encodings/cp037.py" not in train_names + held_names
    assert "encodings/utf_8.py" in train_names + held_names


def test_heldout_rule_is_the_documented_hash():
    names = [f"doc{i}.txt" for i in range(200)] + ["os.py", "pydoc_data/with"]
    expected = [int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") % 20 == 0 for n in names]
    assert [is_heldout(n) for n in names] == expected
    assert is_heldout("doc35.txt") and not is_heldout("doc36.txt")  # pinned: the split must not drift
    assert 4 <= sum(expected[:200]) <= 20  # ~5 %


def test_default_corpus_is_deterministic(full):
    again = default_corpus()
    assert [d.name for d in again.train] == [d.name for d in full.train]
    assert [d.name for d in again.heldout] == [d.name for d in full.heldout]


def test_default_corpus_has_english_and_python(full):
    english = [d for d in full.train if d.name.startswith("pydoc_data/")]
    python = [d for d in full.train if d.name.endswith(".py")]
    assert 300_000 < sum(d.nbytes for d in english) < 1_000_000
    assert sum(d.nbytes for d in python) > 5_000_000
    assert any("with" in d.name for d in english)


def test_default_corpus_cap(full):
    cap = 150_000
    small = default_corpus(max_bytes=cap)
    assert 0.9 * cap <= small.train_bytes <= cap
    assert small.heldout and 0 < small.heldout_bytes < full.heldout_bytes
    assert any(d.name.startswith("pydoc_data/") for d in small.train)
    assert any(d.name.endswith(".py") for d in small.train)
    # the cap only selects from each side: held-out never leaks into train
    assert {d.name for d in small.train} <= {d.name for d in full.train}
    assert {d.name for d in small.heldout} <= {d.name for d in full.heldout}
    assert [d.name for d in default_corpus(max_bytes=cap).train] == [d.name for d in small.train]


# ----- user files --------------------------------------------------------------------------------

def _one_line_error(paths, *fragments):
    with pytest.raises(DataError) as exc:
        load_corpus(paths)
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_bad_inputs_name_the_file(tmp_path):
    _one_line_error([tmp_path / "missing.txt"], "missing.txt", "no such file")

    (tmp_path / "empty.txt").write_text("")
    _one_line_error([tmp_path / "empty.txt"], "empty.txt", "empty")

    (tmp_path / "blank.txt").write_text("  \n\n ")
    _one_line_error([tmp_path / "blank.txt"], "blank.txt", "empty")

    (tmp_path / "emptydir").mkdir()
    _one_line_error([tmp_path / "emptydir"], "emptydir", "folder")

    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    _one_line_error([tmp_path / "binary.txt"], "binary.txt", "binary")

    (tmp_path / "latin1.txt").write_bytes("café crème, déjà vu\n".encode("latin-1"))
    _one_line_error([tmp_path / "latin1.txt"], "latin1.txt", "UTF-8", "0xe9")

    (tmp_path / "data.csv").write_text("text\nhello\n")
    _one_line_error([tmp_path / "data.csv"], "data.csv", "unknown file type")

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    _one_line_error([tmp_path / "bad.jsonl"], "bad.jsonl:2", "not valid JSON")

    (tmp_path / "notext.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    _one_line_error([tmp_path / "notext.jsonl"], "notext.jsonl:2", '"text"')

    (tmp_path / "alltextempty.jsonl").write_text('{"text": ""}\n')
    _one_line_error([tmp_path / "alltextempty.jsonl"], "alltextempty.jsonl", "no non-empty")

    (tmp_path / "fake.parquet").write_bytes(b"this is not parquet at all")
    _one_line_error([tmp_path / "fake.parquet"], "fake.parquet", "parquet")


def test_parquet_without_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "nocol.parquet")
    _one_line_error([tmp_path / "nocol.parquet"], "nocol.parquet", '"text" column', "body")


def test_bad_file_inside_folder_is_named(tmp_path):
    (tmp_path / "good.txt").write_text("hello world\n" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.txt").write_bytes(b"\x00\x01\x02")
    _one_line_error([tmp_path], "bad.txt", "binary")


def test_folder_holds_out_whole_files(tmp_path):
    # split names are paths relative to the folder passed: "part00.txt", "sub/part01.txt", ...
    names = [f"sub/part{i:02d}.txt" if i % 2 else f"part{i:02d}.txt" for i in range(40)]
    expected = {n for n in names if is_heldout(n)}
    assert 0 < len(expected) < len(names)  # precondition for the whole-file split
    (tmp_path / "sub").mkdir()
    for i, name in enumerate(names):
        (tmp_path / name).write_text(f"document {i}\nsecond line\n")
    (tmp_path / "README.md").write_text("ignored: not a data file type")
    corpus = load_corpus([tmp_path])
    assert len(corpus.train) + len(corpus.heldout) == 40
    assert {Path(d.name).relative_to(tmp_path).as_posix() for d in corpus.heldout} == expected
    assert all(d.text.startswith("document") for d in corpus.heldout)  # whole files
    # same split on every call, and wherever the folder lives
    moved = tmp_path.parent / (tmp_path.name + "_moved")
    tmp_path.rename(moved)
    again = load_corpus([str(moved)])
    assert [Path(d.name).name for d in again.heldout] == [Path(d.name).name for d in corpus.heldout]


def test_jsonl_rows_and_tail_split(tmp_path):
    rows = [{"text": f"row {i} " + "word " * 20, "id": i} for i in range(100)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    corpus = load_corpus([path])
    assert [d.text for d in corpus.train + corpus.heldout] == [r["text"] for r in rows]
    assert len(corpus.heldout) == 5 and corpus.heldout[0].text.startswith("row 95 ")


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"parquet row {i}\n" * 3 for i in range(60)]
    pq.write_table(pa.table({"text": texts + [None], "n": list(range(61))}), tmp_path / "d.parquet")
    corpus = load_corpus([tmp_path / "d.parquet"])
    assert [d.text for d in corpus.train + corpus.heldout] == texts
    assert corpus.heldout and corpus.train


def test_single_txt_tail_split_at_blank_line(tmp_path):
    paragraphs = [f"Paragraph {i}.\n" + "Some words here.\n" * 5 for i in range(40)]
    text = "\n".join(paragraphs)
    (tmp_path / "book.txt").write_text(text)
    corpus = load_corpus([tmp_path / "book.txt"])
    assert len(corpus.train) == 1 and len(corpus.heldout) == 1
    assert corpus.train[0].text + corpus.heldout[0].text == text
    assert corpus.train[0].text.endswith("\n\n") and corpus.heldout[0].text.startswith("Paragraph")
    share = len(corpus.heldout[0].text) / len(text)
    assert 0.02 < share < 0.10


def test_two_files_one_side_falls_back_to_tail(tmp_path):
    names = [n for n in (f"f{i}.txt" for i in range(100)) if not is_heldout(n)][:2]
    for n in names:
        (tmp_path / n).write_text(("line of text\n" * 50))
    corpus = load_corpus([tmp_path / n for n in names])
    assert corpus.train and corpus.heldout
    assert "".join(d.text for d in corpus.train + corpus.heldout) == "line of text\n" * 100


# ----- token streams, batches, evaluation --------------------------------------------------------

class _CharTokenizer:
    """A stand-in with the Tokenizer interface the data code uses: one id per character."""

    eos_id = 0

    def encode_batch(self, texts):
        return [[ord(c) for c in t] for t in texts]


def test_encode_documents_puts_eos_after_each():
    docs = [Document("a", "ab"), Document("b", "c")]
    tokens = encode_documents(_CharTokenizer(), docs)
    assert tokens.dtype == torch.int32
    assert tokens.tolist() == [ord("a"), ord("b"), 0, ord("c"), 0]


def test_tokenize_corpus_with_real_tokenizer():
    corpus = default_corpus(max_bytes=50_000)
    tok = Tokenizer.train((d.text for d in corpus.train), vocab_size=400)
    streams = tokenize_corpus(corpus, tok)
    assert streams.train.ndim == 1 and streams.heldout.numel() > 0
    assert int((streams.train == tok.eos_id).sum()) == len(corpus.train)
    first = corpus.train[0].text
    assert tok.decode(streams.train[: len(tok.encode(first))].tolist()) == first


def test_batch_for_step_is_pure_function_of_seed_and_step():
    tokens = torch.arange(10_000, dtype=torch.int32)
    a_x, a_y = batch_for_step(tokens, step=7, batch_size=4, seq_len=16, seed=3)
    for s in range(5):  # drawing other batches in between changes nothing
        batch_for_step(tokens, step=s, batch_size=4, seq_len=16, seed=3)
    torch.manual_seed(12345)  # nor does the global RNG
    b_x, b_y = batch_for_step(tokens, step=7, batch_size=4, seq_len=16, seed=3)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert a_x.shape == (4, 16) and a_x.dtype == torch.int64
    assert torch.equal(a_y[:, :-1], a_x[:, 1:])  # targets are inputs shifted by one
    assert torch.equal(a_x[:, 1:] - a_x[:, :-1], torch.ones(4, 15, dtype=torch.int64))  # contiguous
    c_x, _ = batch_for_step(tokens, step=8, batch_size=4, seq_len=16, seed=3)
    d_x, _ = batch_for_step(tokens, step=7, batch_size=4, seq_len=16, seed=4)
    assert not torch.equal(a_x, c_x) and not torch.equal(a_x, d_x)


def test_batch_for_step_covers_the_stream_end():
    tokens = torch.arange(20, dtype=torch.int32)
    seen_last = False
    for step in range(200):
        x, y = batch_for_step(tokens, step, batch_size=2, seq_len=4, seed=0)
        assert int(y.max()) <= 19
        seen_last |= bool((y == 19).any())
    assert seen_last


def test_batch_for_step_too_short():
    with pytest.raises(DataError, match="seq_len"):
        batch_for_step(torch.arange(8), 0, batch_size=1, seq_len=8, seed=0)


def test_eval_windows_fixed_and_non_overlapping():
    tokens = torch.arange(1001)
    x, y = eval_windows(tokens, seq_len=10, max_windows=1000)
    assert x.shape == (100, 10) and torch.equal(y, x + 1)
    assert torch.equal(x[:, 0], torch.arange(0, 1000, 10))
    x4, _ = eval_windows(tokens, seq_len=10, max_windows=4)
    assert x4[:, 0].tolist() == [0, 330, 660, 990]  # spread over the whole held-out stream
    assert torch.equal(eval_windows(tokens, 10, 4)[0], x4)
    with pytest.raises(DataError, match="held-out"):
        eval_windows(torch.arange(5), seq_len=10, max_windows=4)


def test_unigram_perplexity_hand_computed():
    # counts+1 over vocab 3 from train [0, 0, 1]: [3, 2, 1] / 6 → p(0)=1/2, p(2)=1/6
    # ppl on targets [0, 2] = exp(-(ln 1/2 + ln 1/6) / 2) = sqrt(12)
    ppl = unigram_perplexity(torch.tensor([0, 0, 1]), torch.tensor([[0, 2]]), vocab_size=3)
    assert math.isclose(ppl, math.sqrt(12), rel_tol=1e-12)
    # uniform when there is no training data: perplexity = vocab size
    assert math.isclose(unigram_perplexity(torch.tensor([], dtype=torch.long), torch.tensor([1, 2]), 5), 5.0)
