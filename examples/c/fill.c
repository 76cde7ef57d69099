/*
 * The C ABI in one minute: open the embedded emulated MXA-1, mirror this process into a device
 * address space, let the device fill plain malloc'd memory (it faults the pages in by itself),
 * check the bytes on the CPU, print the statistics.
 *
 * Build and run (after `cargo build -p driver-capi`, from the repository root):
 *   cc -std=c11 -Wall -Wextra -Werror -I driver/capi/include examples/c/fill.c \
 *      -L target/debug -lmirrordrv -Wl,-rpath,$PWD/target/debug -o target/fill && target/fill
 * (driver-capi's tests build and run it: cargo test -p driver-capi --test c_programs).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mirrordrv.h"

/* Print the failed call, its status and the library's message, and leave. */
static void check(int status, const char *what) {
    if (status != MDRV_OK) {
        fprintf(stderr, "%s: %s: %s\n", what, mdrv_status_name(status), mdrv_last_error());
        exit(1);
    }
}

int main(void) {
    mdrv_open_options opts;
    check(mdrv_open_options_init(&opts, sizeof opts), "mdrv_open_options_init"); /* the emulator */
    mdrv_device *dev;
    check(mdrv_device_open(&opts, &dev), "mdrv_device_open");
    mdrv_context *ctx;
    check(mdrv_context_create(dev, &ctx), "mdrv_context_create");

    size_t len = 1 << 20;
    unsigned char *buf = malloc(len); /* ordinary memory: nothing registered, nothing pinned */
    if (buf == NULL) return 1;
    uint64_t ticket;
    check(mdrv_submit_fill(ctx, buf, len, 0x5a5a5a5a5a5a5a5aull, &ticket), "mdrv_submit_fill");
    /* buf belongs to the device until the wait returns. */
    check(mdrv_wait(ctx, ticket, NULL), "mdrv_wait");

    for (size_t i = 0; i < len; i++) {
        if (buf[i] != 0x5a) {
            fprintf(stderr, "byte %zu is %#x, not 0x5a\n", i, buf[i]);
            return 1;
        }
    }
    printf("the device filled %zu bytes of malloc'd memory: checked on the CPU\n", len);

    mdrv_stats s;
    memset(&s, 0, sizeof s);
    s.size = sizeof s;
    check(mdrv_context_stats(ctx, &s), "mdrv_context_stats");
    printf("faults %" PRIu64 ", fault batches %" PRIu64 ", pages mapped %" PRIu64
           ", DMA mappings %" PRIu64 " (%" PRIu64 " KiB), 4K leaves %" PRIu64
           ", 2M leaves %" PRIu64 ", commands %" PRIu64 "\n",
           s.faults, s.fault_batches, s.pages_mapped, s.mappings, s.mapped_bytes >> 10,
           s.small_leaves, s.large_leaves, s.commands);

    check(mdrv_context_destroy(ctx), "mdrv_context_destroy");
    check(mdrv_device_close(dev), "mdrv_device_close");
    free(buf);
    return 0;
}
