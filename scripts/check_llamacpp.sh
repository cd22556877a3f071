#!/usr/bin/env bash
# Check our GGUF export against upstream llama.cpp (not part of CI: it downloads and builds).
#
#   scripts/check_llamacpp.sh                 # uses runs/demo/b158, or trains a tiny model if absent
#   MODEL=path/to/ckpt scripts/check_llamacpp.sh
#
# 1. downloads the llama-cpp-python 0.3.36 source distribution from PyPI (it vendors llama.cpp),
# 2. builds its llama.cpp with cmake: CPU only, Release, just libllama and llama-perplexity,
# 3. exports the model as TQ2_0 and TQ1_0 with `bitnet158 export-gguf`,
# 4. runs llama-perplexity on the held-out text, and scripts/llamacpp_compare.py, which gets
#    llama.cpp's logits through the package's ctypes bindings over the libllama just built and
#    compares next-token argmax (>= 98 % of positions) and perplexity (within 1 %) with ours.
# Everything is built outside the repository, in $LLAMACPP_DIR (default /tmp/llamacpp).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
WORK="${LLAMACPP_DIR:-/tmp/llamacpp}"
VERSION="0.3.36"
JOBS="${JOBS:-2}"
CTX="${CTX:-256}"
SDIST="$WORK/llama_cpp_python-$VERSION"
SRC="$SDIST/vendor/llama.cpp"
BUILD="$WORK/build"
mkdir -p "$WORK"

echo "== llama.cpp from llama-cpp-python $VERSION (sdist) in $WORK"
if [ ! -d "$SRC" ]; then
  "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK" >/dev/null
  tar -xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
fi
if [ ! -f "$BUILD/bin/llama-perplexity" ]; then
  cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF >/dev/null
  nice -n 10 cmake --build "$BUILD" -j "$JOBS" --target llama llama-perplexity
fi
# the bindings need diskcache at import time; keep it out of the project's environment
if [ ! -d "$WORK/pydeps/diskcache" ]; then
  "$PY" -m pip install --quiet --target "$WORK/pydeps" diskcache
fi

MODEL="${MODEL:-$ROOT/runs/demo/b158}"
if [ ! -f "$MODEL/config.json" ] && [ ! -f "$MODEL/latest" ]; then
  MODEL="$WORK/tiny-b158"
  if [ ! -f "$MODEL/latest" ]; then
    echo "== no demo model: training a tiny one ($MODEL)"
    "$PY" -m bitnet158.cli train --preset tiny --steps 200 --max-bytes 2000000 --out "$MODEL" --quiet
  fi
fi
echo "== model: $MODEL"

TEXT="$WORK/heldout.txt"
"$PY" - "$TEXT" <<'EOF'
import sys
from bitnet158.train.data import default_corpus
docs = default_corpus(max_bytes=2_000_000).heldout  # whole held-out files, never trained on
open(sys.argv[1], "w", encoding="utf-8").write("\n\n".join(d.text for d in docs))
EOF
echo "== held-out text: $TEXT ($(wc -c < "$TEXT") bytes)"

for T in tq2_0 tq1_0; do
  "$PY" -m bitnet158.cli export-gguf "$MODEL" "$WORK/model-$T.gguf" --type "$T" --force
done

for T in tq2_0 tq1_0; do
  echo "== llama-perplexity, $T (c=$CTX, F32 KV cache; scores the second half of each chunk)"
  "$BUILD/bin/llama-perplexity" -m "$WORK/model-$T.gguf" -f "$TEXT" -c "$CTX" -b "$CTX" -t "$JOBS" \
    -ctk f32 -ctv f32 2>&1 | grep -E "tokenizing the input|Final estimate" || true
done

echo "== llama.cpp logits (bindings over the libllama built above) vs ours"
LLAMA_CPP_LIB_PATH="$BUILD/bin" PYTHONPATH="$SDIST:$WORK/pydeps${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" "$ROOT/scripts/llamacpp_compare.py" --model "$MODEL" --text "$TEXT" --ctx "$CTX" --threads "$JOBS" \
  "$WORK/model-tq2_0.gguf" "$WORK/model-tq1_0.gguf"
