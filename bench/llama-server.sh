#!/usr/bin/env bash
# Builds llama.cpp's own `llama-server` from the llama.cpp that Stipend's model crate compiles
# (the `llama-cpp-sys-2` crate's vendored copy, same CPU flags: AVX2/FMA/F16C, OpenMP, no native
# tuning), for the prefix-cache benchmark's side-by-side. That crate ships llama.cpp without the
# server's sources, so they come from the one place they are on a package registry: the sdist of
# llama-cpp-python on PyPI (pinned below), whose vendored llama.cpp includes tools/server. Its
# server is a little older than the library; one field renamed since is patched.
#
# Usage: bench/llama-server.sh [OUT_DIR]   (default: $CARGO_TARGET_DIR or target, /llama-server)
# Prints the binary's path last; pass it to the benchmark as STIPEND_LLAMA_SERVER.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="0.3.36"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
OUT="${1:-$TARGET/llama-server}"
mkdir -p "$OUT"
# The version cargo locked, and its source in cargo's registry.
SYS_VERSION="$(cargo metadata --format-version 1 --locked | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "llama-cpp-sys-2"))')"
VENDORED="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$SYS_VERSION"/llama.cpp | head -1)"
[ -d "$VENDORED" ] || { echo "no vendored llama.cpp for llama-cpp-sys-2 $SYS_VERSION: run cargo fetch" >&2; exit 1; }
if [ ! -x "$OUT/build/bin/llama-server" ]; then
    rm -rf "$OUT/src" "$OUT/sdist"
    mkdir -p "$OUT/sdist"
    python3 -m pip download --quiet --no-binary :all: --no-deps "llama-cpp-python==$PY_VERSION" -d "$OUT/sdist"
    tar -xzf "$OUT/sdist/llama_cpp_python-$PY_VERSION.tar.gz" -C "$OUT/sdist"
    UPSTREAM="$OUT/sdist/llama_cpp_python-$PY_VERSION/vendor/llama.cpp"
    cp -r "$VENDORED" "$OUT/src"
    chmod -R u+w "$OUT/src"
    cp -rn "$UPSTREAM/tools/server/." "$OUT/src/tools/server/"
    cp -rn "$UPSTREAM/tools/ui/." "$OUT/src/tools/ui/"
    mkdir -p "$OUT/src/scripts"
    cp "$UPSTREAM/scripts/ui-assets.cmake" "$OUT/src/scripts/"
    # Only what the server needs: the vendored copy lacks the other tools' sources.
    printf 'find_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(ui)\nadd_subdirectory(mtmd)\nadd_subdirectory(server)\n' \
        > "$OUT/src/tools/CMakeLists.txt"
    # Where the two copies differ: mtmd_get_memory_usage now returns a struct holding the
    # per-device map, and common has no fs_open_ifstream.
    sed -i 's/mmproj_mem\.empty()/mmproj_mem.backend_mem_usage.empty()/; s/: mmproj_mem)/: mmproj_mem.backend_mem_usage)/g' \
        "$OUT/src/tools/server/server-context.cpp"
    sed -i 's/fs_open_ifstream(/std::ifstream(/g' "$OUT"/src/tools/server/*.cpp
    cmake -S "$OUT/src" -B "$OUT/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
        -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DGGML_NATIVE=OFF -DGGML_CCACHE=OFF > "$OUT/cmake.log"
    cmake --build "$OUT/build" --target llama-server -j "$(nproc)" > "$OUT/build.log"
fi
echo "$OUT/build/bin/llama-server"
