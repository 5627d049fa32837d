/* A WASI command in C that works on files and prints what happened, one line per operation,
 * so that tests (and users trying volumes) can see what a sandbox can reach:
 *
 *   read PATH              the file's first line, or the error
 *   write PATH BYTES       write BYTES bytes in 4 KiB chunks; how many made it, and the error
 *   symlink TARGET LINK    create a symlink
 *   env NAME               an environment variable
 *   poll PATH TEXT MS      re-read PATH every 20 ms until its first line is TEXT, up to MS ms
 *
 * Build (Debian: apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32):
 *   clang --target=wasm32-wasi -O2 -Wl,--strip-all -o files.wasm files.c
 * node-agent/tests/examples.rs rebuilds it and fails if the committed files.wasm differs.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Reads the first line of `path` into `line`; returns 0, or an errno. */
static int first_line(const char *path, char *line, size_t size) {
    FILE *f = fopen(path, "r");
    if (!f) {
        return errno;
    }
    if (!fgets(line, (int)size, f)) {
        line[0] = '\0';
    }
    line[strcspn(line, "\n")] = '\0';
    fclose(f);
    return 0;
}

static void do_read(const char *path) {
    char line[256];
    int error = first_line(path, line, sizeof line);
    if (error) {
        printf("read %s: error: %s\n", path, strerror(error));
    } else {
        printf("read %s: ok: %s\n", path, line);
    }
}

static void do_write(const char *path, long bytes) {
    static char chunk[4096];
    memset(chunk, 'x', sizeof chunk);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        printf("write %s: error: %s\n", path, strerror(errno));
        return;
    }
    long written = 0;
    while (written < bytes) {
        size_t n = (size_t)(bytes - written) < sizeof chunk ? (size_t)(bytes - written) : sizeof chunk;
        ssize_t w = write(fd, chunk, n);
        if (w < 0) {
            printf("write %s: wrote %ld then error: %s\n", path, written, strerror(errno));
            close(fd);
            return;
        }
        written += w;
    }
    if (fsync(fd) != 0 && errno != EINVAL && errno != ENOTSUP) {
        printf("write %s: wrote %ld then error: %s\n", path, written, strerror(errno));
        close(fd);
        return;
    }
    close(fd);
    printf("write %s: ok: %ld\n", path, written);
}

static void do_poll(const char *path, const char *text, long ms) {
    char line[256];
    struct timespec pause = {0, 20 * 1000 * 1000};
    for (long waited = 0; waited <= ms; waited += 20) {
        if (first_line(path, line, sizeof line) == 0 && strcmp(line, text) == 0) {
            printf("poll %s: saw %s\n", path, text);
            return;
        }
        nanosleep(&pause, NULL);
    }
    printf("poll %s: timeout, last: %s\n", path, line);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *op = argv[i];
        if (strcmp(op, "read") == 0 && i + 1 < argc) {
            do_read(argv[++i]);
        } else if (strcmp(op, "write") == 0 && i + 2 < argc) {
            do_write(argv[i + 1], atol(argv[i + 2]));
            i += 2;
        } else if (strcmp(op, "symlink") == 0 && i + 2 < argc) {
            if (symlink(argv[i + 1], argv[i + 2]) != 0) {
                printf("symlink %s: error: %s\n", argv[i + 2], strerror(errno));
            } else {
                printf("symlink %s: ok\n", argv[i + 2]);
            }
            i += 2;
        } else if (strcmp(op, "env") == 0 && i + 1 < argc) {
            const char *value = getenv(argv[++i]);
            printf("env %s: %s\n", argv[i], value ? value : "(unset)");
        } else if (strcmp(op, "poll") == 0 && i + 3 < argc) {
            do_poll(argv[i + 1], argv[i + 2], atol(argv[i + 3]));
            i += 3;
        } else {
            printf("unknown operation %s\n", op);
            return 2;
        }
        fflush(stdout);
    }
    return 0;
}
