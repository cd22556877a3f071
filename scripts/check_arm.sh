#!/usr/bin/env bash
# The arm64 kernels, checked without ARM hardware: cross-compiles the kernel translation units and
# tests/native/arm_check.cpp with aarch64-linux-gnu-g++ (static, no Python) and runs the check under
# qemu-aarch64 on CPUs with and without the optional instructions:
#   -cpu max          every path (neon, dotprod, i8mm); detection must pick i8mm
#   -cpu neoverse-n1  ARMv8.2 with the dot product, no i8mm (or cortex-a76); detection must pick dotprod
#   -cpu cortex-a53   ARMv8.0, Advanced SIMD only; detection must pick neon
#   BITNET158_KERNEL=neon on -cpu max (a forced narrower path), and BITNET158_KERNEL=i8mm on
#   -cpu cortex-a57, which must be refused
# Every path is compared bit for bit with the scalar oracle (arm_check.cpp says on what), and with
# cases packed by the Python package on this machine (the same file must give the same products on
# arm64). Every csrc/*.cpp must compile for arm64 (the pybind11 units as a syntax check), and a
# build with -DBN158_BREAK_NEON (one wrong lane in the neon kernels) must FAIL the check.
#
#   scripts/check_arm.sh            # 500 random shapes per run (the default)
#   scripts/check_arm.sh --quick    # 60 shapes, and no pybind11 syntax check (the pytest run)
#   scripts/check_arm.sh --shapes N
# Installs qemu-user and g++-aarch64-linux-gnu with apt-get when they are missing and it can
# (root, apt-get present, BITNET158_NO_INSTALL unset); otherwise prints a SKIP line and exits 0.
# Objects are cached in build/arm_check (rebuilt when a source or header is newer).
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SHAPES=500
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; SHAPES=60 ;;
    --shapes) SHAPES="$2"; shift ;;
    *) echo "usage: $0 [--quick] [--shapes N]" >&2; exit 2 ;;
  esac
  shift
done
CXX="${CXX_AARCH64:-aarch64-linux-gnu-g++}"
QEMU="${QEMU_AARCH64:-qemu-aarch64}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="$ROOT/build/arm_check"

have_tools() { command -v "$CXX" >/dev/null 2>&1 && command -v "$QEMU" >/dev/null 2>&1; }
if ! have_tools; then
  if [ -n "${BITNET158_NO_INSTALL:-}" ]; then
    echo "SKIP: $CXX or $QEMU missing (BITNET158_NO_INSTALL is set)"; exit 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "SKIP: $CXX or $QEMU missing, and no root apt-get to install qemu-user g++-aarch64-linux-gnu"; exit 0
  fi
  echo "== installing qemu-user g++-aarch64-linux-gnu"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user g++-aarch64-linux-gnu >/dev/null 2>&1 ||
         { apt-get update -q >/dev/null 2>&1 &&
           DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user g++-aarch64-linux-gnu >/dev/null 2>&1; }; } ||
     ! have_tools; then
    echo "SKIP: apt-get could not install qemu-user g++-aarch64-linux-gnu"; exit 0
  fi
fi

FLAGS=(-std=c++17 -O3 -Wall -Wextra -Werror -fno-math-errno -I"$ROOT/csrc")  # setup.py's -O3
# a cache built by another compiler or other flags starts over
STAMP="$("$CXX" -dumpfullversion 2>/dev/null) ${FLAGS[*]}"
if [ "$(cat "$OUT/flags" 2>/dev/null)" != "$STAMP" ]; then rm -rf "$OUT"; fi
mkdir -p "$OUT"
printf '%s' "$STAMP" > "$OUT/flags"
HEADERS=("$ROOT"/csrc/*.h)
newest_header=$(ls -t "${HEADERS[@]}" | head -1)

# obj SRC OBJ [extra flags...]: compile when the object is missing or older than SRC or any header
obj() {
  local src="$1" o="$2"; shift 2
  if [ ! -f "$o" ] || [ "$src" -nt "$o" ] || [ "$newest_header" -nt "$o" ]; then
    nice -n 19 "$CXX" "${FLAGS[@]}" "$@" -c "$src" -o "$o" || { echo "FAIL: $src does not compile for arm64"; exit 1; }
  fi
}

echo "== compiling csrc/ for arm64 with $("$CXX" -dumpfullversion 2>/dev/null || echo "$CXX")"
OBJS=()
for src in "$ROOT"/csrc/*.cpp; do
  base="$(basename "$src" .cpp)"
  case "$base" in
    bindings|forward_step_bindings) continue ;;  # pybind11 units: syntax check below
  esac
  obj "$src" "$OUT/$base.o"
  OBJS+=("$OUT/$base.o")
done
obj "$ROOT/tests/native/arm_check.cpp" "$OUT/arm_check.o"
nice -n 19 "$CXX" -static -pthread -o "$OUT/arm_check" "$OUT/arm_check.o" "${OBJS[@]}" ||
  { echo "FAIL: arm_check does not link"; exit 1; }

if [ "$QUICK" = 0 ]; then
  if PYB="$("$PY" -c 'import pybind11; print(pybind11.get_include())' 2>/dev/null)" &&
     PYI="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null)"; then
    for base in bindings forward_step_bindings; do  # the host's Python headers: LP64 like arm64
      nice -n 19 "$CXX" "${FLAGS[@]}" -I"$PYB" -I"$PYI" -fsyntax-only "$ROOT/csrc/$base.cpp" ||
        { echo "FAIL: csrc/$base.cpp does not compile for arm64"; exit 1; }
    done
    echo "every csrc/*.cpp compiles for arm64"
  else
    echo "(no pybind11 in $PY: the two binding units were not syntax-checked)"
  fi
fi

# Cases packed by the Python package on this machine, with their products from numpy: the bytes a
# file holds must give the same numbers on arm64.
VEC_ARGS=()
if PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" nice -n 19 "$PY" - "$OUT/vectors.bin" "$SHAPES" <<'PYEOF' 2>/dev/null
import struct, sys
import numpy as np
from bitnet158.formats import FORMATS, get_format
path, shapes = sys.argv[1], int(sys.argv[2])
native = ["i2", "base3", "lut2"]  # csrc/formats.h's Format order
assert sorted(FORMATS) == sorted(native)
rng = np.random.default_rng(158)
with open(path, "wb") as f:
    f.write(b"BN158VEC")
    for i in range(max(30, shapes // 5)):
        m, n = int(rng.integers(1, 20)), int(rng.integers(1, 90))
        k = int(rng.choice([rng.integers(1, 700), 128 * rng.integers(1, 5), 160 * rng.integers(1, 4) + 1]))
        x = rng.integers(-128, 128, size=(m, k), dtype=np.int8)
        codes = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
        want = (x.astype(np.int32) @ codes.astype(np.int32).T).astype("<i4")
        for fi, name in enumerate(native):
            packed = np.ascontiguousarray(get_format(name).pack(codes), dtype=np.uint8)
            f.write(struct.pack("<5q", fi, m, n, k, packed.size))
            f.write(x.tobytes() + packed.tobytes() + want.tobytes())
PYEOF
then
  VEC_ARGS=(--vectors "$OUT/vectors.bin")
else
  echo "(the Python package did not load with $PY: no cases packed by it)"
fi

status=0
# run LABEL EXPECTED_RC CPU [ENV=V...] -- ARGS...
run() {
  local label="$1" want="$2" cpu="$3"; shift 3
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  echo "== $label (qemu -cpu $cpu${envs:+ ${envs[*]}})"
  local log rc
  log="$(env "${envs[@]}" nice -n 19 "$QEMU" -cpu "$cpu" "$OUT/arm_check" "$@" 2>&1)"; rc=$?
  printf '%s\n' "$log" | sed 's/^/   /'
  if [ "$rc" != "$want" ]; then
    echo "FAIL: $label exited $rc, expected $want"; status=1
  fi
}
run "every path"                 0 max          -- --shapes "$SHAPES" --expect-best i8mm "${VEC_ARGS[@]}"
# a CPU model with the dot product and without i8mm (qemu 7.1 and later have both of these)
CPUS="$("$QEMU" -cpu help 2>/dev/null)"
DOTCPU=""
for c in neoverse-n1 cortex-a76; do
  if printf '%s\n' "$CPUS" | grep -qw -- "$c"; then DOTCPU="$c"; break; fi
done
if [ -n "$DOTCPU" ]; then
  run "ARMv8.2 + dotprod, no i8mm" 0 "$DOTCPU" -- --shapes "$SHAPES" --expect-best dotprod "${VEC_ARGS[@]}"
else
  echo "== (this qemu has no CPU model with dotprod but without i8mm: that run is left out)"
fi
run "ARMv8.0, no dotprod"        0 cortex-a53   -- --shapes "$SHAPES" --expect-best neon "${VEC_ARGS[@]}"
run "forced narrower path"       0 max BITNET158_KERNEL=neon -- --shapes $((SHAPES / 5 + 1))
run "forced path the CPU lacks"  2 cortex-a57 BITNET158_KERNEL=i8mm -- --shapes 1

# The check must be able to fail: the same build with one lane of the neon kernels flipped.
echo "== self-test: a neon build with one wrong lane (-DBN158_BREAK_NEON) must fail"
obj "$ROOT/csrc/ternary_neon.cpp" "$OUT/ternary_neon_broken.o" -DBN158_BREAK_NEON
BROKEN=()
for o in "${OBJS[@]}"; do [ "$(basename "$o")" = ternary_neon.o ] && BROKEN+=("$OUT/ternary_neon_broken.o") || BROKEN+=("$o"); done
nice -n 19 "$CXX" -static -pthread -o "$OUT/arm_check_broken" "$OUT/arm_check.o" "${BROKEN[@]}" ||
  { echo "FAIL: the broken variant does not link"; exit 1; }
log="$(BITNET158_KERNEL=neon nice -n 19 "$QEMU" -cpu cortex-a53 "$OUT/arm_check_broken" --shapes "$SHAPES" 2>&1)"; rc=$?
printf '%s\n' "$log" | sed 's/^/   /'
if [ "$rc" = 1 ]; then
  echo "   (failed, as it must)"
else
  echo "FAIL: the broken variant exited $rc, expected 1 (a mismatch)"; status=1
fi

if [ "$status" = 0 ]; then echo "PASS: arm64 kernels equal the scalar oracle ($SHAPES shapes per run)"; fi
exit "$status"
