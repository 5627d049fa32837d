/* A WASI command in C for `flotilla run`: writes to stdout and stderr, copies stdin to stdout,
 * and exits with a chosen code.
 *
 *   stdout: "out:" and its arguments, one raw 0xff byte (not UTF-8) and a newline, then stdin;
 *   stderr: "err: to stderr";
 *   exit code: $EXIT_CODE (default 0).
 *
 * Build (Debian: apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32):
 *   clang --target=wasm32-wasi -O2 -Wl,--strip-all -o stdio.wasm stdio.c
 * node-agent/tests/examples.rs rebuilds it and fails if the committed stdio.wasm differs.
 */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    fputs("out:", stdout);
    for (int i = 1; i < argc; i++) {
        printf(" %s", argv[i]);
    }
    fputs(" \xff\n", stdout);
    fflush(stdout);
    fputs("err: to stderr\n", stderr);
    fflush(stderr);
    char buffer[4096];
    size_t n;
    while ((n = fread(buffer, 1, sizeof buffer, stdin)) > 0) {
        fwrite(buffer, 1, n, stdout);
    }
    fflush(stdout);
    const char *code = getenv("EXIT_CODE");
    return code ? atoi(code) : 0;
}
