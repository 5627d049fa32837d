/* A WASI command in C: prints its arguments and one environment variable.
 *
 * Build (Debian: apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32):
 *   clang --target=wasm32-wasi -O2 -Wl,--strip-all -o hello-c.wasm hello-c.c
 * node-agent/tests/examples.rs rebuilds it and fails if the committed hello-c.wasm differs.
 */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    const char *greeting = getenv("GREETING");
    printf("%s from C", greeting ? greeting : "hello");
    for (int i = 1; i < argc; i++) {
        printf(" %s", argv[i]);
    }
    printf("\n");
    return 0;
}
