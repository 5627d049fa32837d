#!/bin/sh
# Builds the HTTP guests (hello.wasm, echo.wasm): wasi:http/proxy components in C.
#
#   1. Bindings, only when wit/ changes (wit-bindgen-cli 0.63.0):
#        cargo install wit-bindgen-cli --version 0.63.0 --locked
#        wit-bindgen c --no-object-file --world http-guest wit --out-dir gen
#   2. Components, from the repository root (needs Debian's clang, lld and wasi-libc, which
#      .ci/setup installs): each .c file is compiled with clang --target=wasm32-wasi
#      -mexec-model=reactor -O2 together with gen/http_guest.c, given the world's type
#      information from wit/, and wrapped with wasmtime 48's preview 1 proxy adapter by the
#      wit-component crate. node-agent/tests/examples.rs does the same and fails when a
#      committed binary differs.
set -eu
cd "$(dirname "$0")/../../.."
cargo run -p flotilla-tests --bin build-guests
