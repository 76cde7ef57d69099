/*
 * The C ABI's test program, compiled with the system cc against libmirrordrv and run by
 * driver-capi's tests/c_programs.rs (cargo test -p driver-capi). One case per run:
 *
 *   capi_test data [vfio-user SOCKET]  data checked on malloc, mmap and stack memory
 *   capi_test strict                   strict munmap/madvise/mprotect/mremap, then device access
 *   capi_test args                     NULL, unaligned, out-of-range, wrong-handle, stale-ticket
 *                                      and use-after-destroy arguments: each its documented code
 *   capi_test limits                   the mapped-bytes quota; a wait that times out
 *   capi_test threads                  several pthreads submitting on one context at once
 *   capi_test daemon SOCKET            a daemon client: arenas, data, the daemon's refusals
 *
 * Prints one line per check and "capi_test CASE: N passed, M failed" last; exits 1 on failure.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mirrordrv.h"

static int passed, failed;
static const char *case_name = "?";

static void expect(int cond, const char *what) {
    if (cond) {
        passed++;
        printf("ok: %s\n", what);
    } else {
        failed++;
        printf("FAIL: %s (last error: %s)\n", what, mdrv_last_error());
    }
    fflush(stdout);
}

/* A call that must return `want`; says what it got otherwise. */
static void expect_status(int got, int want, const char *what) {
    if (got == want) {
        passed++;
        printf("ok: %s -> %s\n", what, mdrv_status_name(got));
    } else {
        failed++;
        printf("FAIL: %s -> %s, expected %s (last error: %s)\n", what, mdrv_status_name(got),
               mdrv_status_name(want), mdrv_last_error());
    }
    fflush(stdout);
}

static int finish(void) {
    printf("capi_test %s: %d passed, %d failed\n", case_name, passed, failed);
    return failed == 0 ? 0 : 1;
}

static void must(int status, const char *what) {
    if (status != MDRV_OK) {
        printf("FAIL: %s -> %s: %s\n", what, mdrv_status_name(status), mdrv_last_error());
        failed++;
        exit(finish());
    }
}

static uint64_t fnv1a(const unsigned char *p, size_t len) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static int all_bytes(const unsigned char *p, size_t len, unsigned char v) {
    for (size_t i = 0; i < len; i++)
        if (p[i] != v) return 0;
    return 1;
}

/* Wait for the ticket a submit stored in *ticket (read here, after the submit has run: the
 * order in which a call's arguments are evaluated is unspecified). */
static int run(mdrv_context *ctx, int status_of_submit, const uint64_t *ticket, uint64_t *result) {
    if (status_of_submit != MDRV_OK) return status_of_submit;
    return mdrv_wait(ctx, *ticket, result);
}

static int fill(mdrv_context *ctx, void *dst, size_t len, uint64_t pattern) {
    uint64_t t = 0;
    return run(ctx, mdrv_submit_fill(ctx, dst, len, pattern, &t), &t, NULL);
}

static mdrv_device *open_device(uint32_t kind, const char *path) {
    mdrv_open_options o;
    must(mdrv_open_options_init(&o, sizeof o), "mdrv_open_options_init");
    o.kind = kind;
    o.path = path;
    mdrv_device *dev = NULL;
    must(mdrv_device_open(&o, &dev), "mdrv_device_open");
    return dev;
}

static const size_t PAGE = 4096;

/* ---- data on malloc, mmap and stack memory ---- */
static void case_data(uint32_t kind, const char *path) {
    mdrv_device *dev = open_device(kind, path);
    mdrv_context *ctx;
    must(mdrv_context_create(dev, &ctx), "mdrv_context_create");
    expect(mdrv_abi_version() == MDRV_ABI_VERSION, "mdrv_abi_version() == MDRV_ABI_VERSION");

    size_t len = 256 << 10;
    unsigned char *heap = malloc(len);
    memset(heap, 0, len);
    expect_status(fill(ctx, heap, len, 0x1111111111111111ull), MDRV_OK, "fill malloc'd memory");
    expect(all_bytes(heap, len, 0x11), "malloc'd bytes read 0x11 on the CPU");

    unsigned char *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    expect(map != MAP_FAILED, "mmap");
    expect_status(fill(ctx, map, len, 0x2222222222222222ull), MDRV_OK, "fill mmap'd memory");
    expect(all_bytes(map, len, 0x22), "mmap'd bytes read 0x22 on the CPU");

    unsigned char stack[3 * 4096 + 100];
    memset(stack, 0, sizeof stack);
    expect_status(fill(ctx, stack + 7, sizeof stack - 7, 0x3333333333333333ull), MDRV_OK,
                  "fill stack memory (unaligned start, odd length)");
    expect(all_bytes(stack + 7, sizeof stack - 7, 0x33) && all_bytes(stack, 7, 0),
           "stack bytes read 0x33 on the CPU, the 7 before untouched");

    uint64_t t, result = 0;
    for (size_t i = 0; i < len; i++) heap[i] = (unsigned char)(i * 7 + 3);
    expect_status(run(ctx, mdrv_submit_copy(ctx, map, heap, len, &t), &t, NULL), MDRV_OK,
                  "copy malloc -> mmap");
    expect(memcmp(map, heap, len) == 0, "the copy matches on the CPU");
    expect_status(run(ctx, mdrv_submit_checksum(ctx, map, len, &t), &t, &result), MDRV_OK,
                  "checksum of the mmap'd memory");
    expect(result == fnv1a(map, len), "device checksum == CPU FNV-1a");

    uint64_t counter = 40; /* on the stack */
    for (int i = 0; i < 100; i++) {
        if (run(ctx, mdrv_submit_atomic_add(ctx, &counter, 2, &t), &t, &result) != MDRV_OK) break;
    }
    expect(counter == 240 && result == 238, "100 device atomic adds of 2 on a stack counter: 240");

    expect_status(run(ctx, mdrv_submit_prefetch(ctx, heap, len, &t), &t, NULL), MDRV_OK,
                  "prefetch");
    mdrv_device_entry e;
    memset(&e, 0, sizeof e);
    e.size = sizeof e;
    must(mdrv_get_device_entry(ctx, heap, &e), "mdrv_get_device_entry");
    expect(e.present == 1 && e.readable == 1 && e.writable == 1 &&
               (e.page_size == 4096 || e.page_size == 2u << 20),
           "the device has a read-write entry for the filled malloc'd memory");

    /* The bounded wait and the poll: a command on fresh memory, polled until it completes. */
    size_t big = 4 << 20;
    unsigned char *fresh = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    must(mdrv_submit_fill(ctx, fresh, big, 0x4444444444444444ull, &t), "submit a 4 MiB fill");
    int st, polls = 0;
    while ((st = mdrv_poll(ctx, t, NULL)) == MDRV_PENDING) polls++;
    expect_status(st, MDRV_OK, "mdrv_poll until the fill completed");
    printf("   (%d polls saw MDRV_PENDING)\n", polls);
    expect(all_bytes(fresh, big, 0x44), "the polled fill's bytes read 0x44");
    expect_status(mdrv_poll(ctx, t, NULL), MDRV_ERR_BAD_TICKET, "poll a collected ticket");
    must(mdrv_submit_fill(ctx, fresh, big, 0x5555555555555555ull, &t), "submit another");
    do st = mdrv_wait_for(ctx, t, 1, NULL); while (st == MDRV_PENDING);
    expect_status(st, MDRV_OK, "mdrv_wait_for(1 ms) until it completed");

    mdrv_stats s;
    memset(&s, 0, sizeof s);
    s.size = sizeof s;
    must(mdrv_context_stats(ctx, &s), "mdrv_context_stats");
    printf("   stats: faults %" PRIu64 ", pages mapped %" PRIu64 ", mappings %" PRIu64
           ", commands %" PRIu64 ", in flight %" PRIu64 "\n",
           s.faults, s.pages_mapped, s.mappings, s.commands, s.in_flight);
    expect(s.size == sizeof s && s.faults > 0 && s.pages_mapped > 0 && s.commands >= 108 &&
               s.in_flight == 0,
           "stats: faults, mapped pages and commands counted, nothing in flight");

    must(mdrv_context_destroy(ctx), "mdrv_context_destroy");
    must(mdrv_device_close(dev), "mdrv_device_close");
    munmap(map, len);
    munmap(fresh, big);
    free(heap);
}

/* ---- strict wrappers, then a device access ---- */
static void case_strict(void) {
    mdrv_device *dev = open_device(MDRV_DEVICE_EMULATED, NULL);
    mdrv_context *ctx;
    must(mdrv_context_create(dev, &ctx), "mdrv_context_create");
    unsigned char *m = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    must(fill(ctx, m, 4 * PAGE, 0x6666666666666666ull), "fill 4 pages");
    mdrv_device_entry e;
    memset(&e, 0, sizeof e);
    e.size = sizeof e;
    must(mdrv_get_device_entry(ctx, m + 3 * PAGE, &e), "entry query");
    expect(e.present == 1, "page 3 has a device entry after the fill");

    expect_status(mdrv_munmap(ctx, m + 3 * PAGE, PAGE), MDRV_OK, "strict munmap of page 3");
    e.size = sizeof e;
    must(mdrv_get_device_entry(ctx, m + 3 * PAGE, &e), "entry query");
    expect(e.present == 0, "page 3 has no device entry once mdrv_munmap returned");
    expect_status(fill(ctx, m + 3 * PAGE, 8, 1), MDRV_ERR_NO_MAPPING,
                  "a device write to the unmapped page");
    expect(strlen(mdrv_last_error()) > 0, "... with a message");
    expect_status(fill(ctx, m, PAGE, 0x7777777777777777ull), MDRV_OK, "page 0 still works");
    expect(all_bytes(m, PAGE, 0x77), "page 0 reads 0x77");

    expect_status(mdrv_madvise(ctx, m + PAGE, PAGE, MADV_DONTNEED), MDRV_OK,
                  "strict madvise(MADV_DONTNEED) of page 1");
    uint64_t t, sum = 0;
    must(run(ctx, mdrv_submit_checksum(ctx, m + PAGE, PAGE, &t), &t, &sum), "checksum page 1");
    unsigned char zero[4096];
    memset(zero, 0, sizeof zero);
    expect(sum == fnv1a(zero, PAGE), "the device reads the discarded page as zeroes");

    expect_status(mdrv_mprotect(ctx, m + 2 * PAGE, PAGE, PROT_READ), MDRV_OK,
                  "strict mprotect(PROT_READ) of page 2");
    expect_status(fill(ctx, m + 2 * PAGE, 8, 1), MDRV_ERR_PERMISSION,
                  "a device write to the read-only page");
    expect(m[2 * PAGE] == 0x66, "the read-only page is untouched");
    expect_status(mdrv_mprotect(ctx, m + 2 * PAGE, PAGE, PROT_READ | 0x1000), MDRV_ERR_INVALID_ARGUMENT,
                  "mprotect with unknown prot bits");

    void *moved = NULL;
    expect_status(mdrv_mremap(ctx, m, PAGE, 2 * PAGE, MREMAP_MAYMOVE, NULL, &moved), MDRV_OK,
                  "strict mremap of page 0 to 2 pages");
    expect_status(fill(ctx, moved, 2 * PAGE, 0x0808080808080808ull), MDRV_OK,
                  "fill the remapped range");
    expect(((unsigned char *)moved)[0] == 0x08 && ((unsigned char *)moved)[2 * PAGE - 1] == 0x08,
           "the remapped range reads 0x08");
    expect_status(mdrv_invalidate(ctx, moved, 2 * PAGE), MDRV_OK, "invalidate");
    e.size = sizeof e;
    must(mdrv_get_device_entry(ctx, moved, &e), "entry query");
    expect(e.present == 0, "no device entry after mdrv_invalidate");
    expect_status(mdrv_settle(ctx), MDRV_OK, "settle");

    /* An arena is unmapped by the library: the strict munmap and mremap refuse it. */
    unsigned char *arena = NULL;
    must(mdrv_arena_alloc(ctx, 4 * PAGE, (void **)&arena), "mdrv_arena_alloc 16 KiB in-process");
    expect_status(fill(ctx, arena, 4 * PAGE, 0x7777777777777777ull), MDRV_OK, "fill the arena");
    expect_status(mdrv_munmap(ctx, arena + PAGE, PAGE), MDRV_ERR_INVALID_ARGUMENT,
                  "strict munmap of an arena page");
    void *arena_moved = NULL;
    expect_status(mdrv_mremap(ctx, arena, 4 * PAGE, 8 * PAGE, MREMAP_MAYMOVE, NULL, &arena_moved),
                  MDRV_ERR_INVALID_ARGUMENT, "strict mremap of an arena");
    expect(all_bytes(arena, 4 * PAGE, 0x77), "the arena is still mapped and whole");
    expect_status(mdrv_arena_free(ctx, arena), MDRV_OK, "free the arena");

    must(mdrv_context_destroy(ctx), "mdrv_context_destroy");
    must(mdrv_device_close(dev), "mdrv_device_close");
}

/* ---- bad arguments: each its documented code, never a crash ---- */
static void case_args(void) {
    mdrv_open_options o;
    mdrv_device *dev = NULL;
    expect_status(mdrv_open_options_init(NULL, sizeof o), MDRV_ERR_NULL_POINTER, "options init on NULL");
    expect_status(mdrv_device_open(NULL, &dev), MDRV_ERR_NULL_POINTER, "open with NULL options");
    must(mdrv_open_options_init(&o, sizeof o), "init");
    expect_status(mdrv_device_open(&o, NULL), MDRV_ERR_NULL_POINTER, "open with NULL out");
    expect_status(mdrv_open_options_init(&o, 4), MDRV_ERR_INVALID_ARGUMENT, "options init, size 4");
    o.size = 4;
    expect_status(mdrv_device_open(&o, &dev), MDRV_ERR_INVALID_ARGUMENT, "options size 4");
    must(mdrv_open_options_init(&o, sizeof o), "init");
    o.kind = 99;
    expect_status(mdrv_device_open(&o, &dev), MDRV_ERR_INVALID_ARGUMENT, "unknown device kind");
    must(mdrv_open_options_init(&o, sizeof o), "init");
    o.kind = MDRV_DEVICE_VFIO_USER;
    expect_status(mdrv_device_open(&o, &dev), MDRV_ERR_NULL_POINTER, "vfio-user with no path");
    o.path = "/nonexistent/mxa.sock";
    expect_status(mdrv_device_open(&o, &dev), MDRV_ERR_DEVICE, "vfio-user socket that is not there");
    o.kind = MDRV_DEVICE_KERNEL_VFIO;
    o.path = "0000:ff:1f.7";
    expect_status(mdrv_device_open(&o, &dev), MDRV_ERR_DEVICE, "kernel VFIO address with no device");
    expect(strstr(mdrv_last_error(), "0000:ff:1f.7") != NULL, "... the message names the address");
    {
        /* A struct from a "newer header": larger, with a field this library does not know. */
        struct { mdrv_open_options o; uint64_t newer; } big;
        memset(&big, 0xff, sizeof big);
        must(mdrv_open_options_init(&big.o, sizeof big), "init a larger struct");
        expect(big.o.size == sizeof big && big.newer == 0, "... its size stored, the unknown field zeroed");
        big.newer = 1;
        expect_status(mdrv_device_open(&big.o, &dev), MDRV_ERR_UNSUPPORTED,
                      "a larger options struct setting an unknown field");
        big.newer = 0;
        expect_status(mdrv_device_open(&big.o, &dev), MDRV_OK,
                      "a larger options struct whose unknown field is 0");
        expect_status(mdrv_device_close(dev), MDRV_OK, "close it");
    }

    dev = open_device(MDRV_DEVICE_EMULATED, NULL);
    mdrv_context *ctx, *other;
    must(mdrv_context_create(dev, &ctx), "create");
    must(mdrv_context_create(dev, &other), "create a second context");
    expect_status(mdrv_context_create(dev, NULL), MDRV_ERR_NULL_POINTER, "create with NULL out");

    unsigned char *buf = malloc(2 * PAGE);
    uint64_t t;
    expect_status(mdrv_submit_fill(ctx, NULL, 8, 0, &t), MDRV_ERR_NULL_POINTER, "fill NULL");
    expect_status(mdrv_submit_fill(ctx, buf, 8, 0, NULL), MDRV_ERR_NULL_POINTER, "NULL ticket");
    expect_status(mdrv_submit_copy(ctx, buf, NULL, 8, &t), MDRV_ERR_NULL_POINTER, "copy from NULL");
    expect_status(mdrv_submit_checksum(ctx, NULL, 8, &t), MDRV_ERR_NULL_POINTER, "checksum NULL");
    expect_status(mdrv_submit_fill(ctx, buf, 0, 0, &t), MDRV_ERR_INVALID_ARGUMENT, "length 0");
    expect_status(mdrv_context_stats(ctx, NULL), MDRV_ERR_NULL_POINTER, "stats into NULL");
    mdrv_stats s;
    s.size = 2;
    expect_status(mdrv_context_stats(ctx, &s), MDRV_ERR_INVALID_ARGUMENT, "stats size 2");
    s.size = 1u << 20;
    expect_status(mdrv_context_stats(ctx, &s), MDRV_ERR_INVALID_ARGUMENT, "stats size 1 MiB (uninitialised)");
    memset(&s, 0xab, sizeof s);
    s.size = 12; /* between two fields */
    must(mdrv_context_stats(ctx, &s), "stats size 12");
    expect(s.size == 8, "a size between two fields: only whole fields written, size says 8");
    {
        uint64_t second;
        memcpy(&second, (unsigned char *)&s + 8, sizeof second);
        expect(second == 0xababababababababull, "the half-covered field is left whole");
    }
    mdrv_open_options big_opts;
    mdrv_open_options_init(&big_opts, sizeof big_opts);
    big_opts.size = 1u << 20;
    mdrv_device *nodev = NULL;
    expect_status(mdrv_device_open(&big_opts, &nodev), MDRV_ERR_INVALID_ARGUMENT, "options size 1 MiB");

    expect_status(mdrv_submit_atomic_add(ctx, (uint64_t *)(void *)(buf + 1), 1, &t),
                  MDRV_ERR_UNALIGNED, "atomic add on an unaligned target");
    expect_status(mdrv_munmap(ctx, buf + 1, PAGE), MDRV_ERR_UNALIGNED, "munmap unaligned");
    expect_status(mdrv_invalidate(ctx, (void *)(uintptr_t)0x10000, 100), MDRV_ERR_UNALIGNED,
                  "invalidate with an unaligned length");

    expect_status(mdrv_submit_fill(ctx, (void *)(uintptr_t)0x800000000000ull, 8, 0, &t),
                  MDRV_ERR_OUT_OF_RANGE, "fill past the 47-bit user address space");
    expect_status(mdrv_submit_fill(ctx, (void *)(UINTPTR_MAX - 3), 8, 0, &t),
                  MDRV_ERR_OUT_OF_RANGE, "fill wrapping around");
    expect_status(mdrv_munmap(ctx, (void *)(uintptr_t)0x7ffffffff000ull, 2 * PAGE),
                  MDRV_ERR_OUT_OF_RANGE, "munmap past the user address space");
    expect_status(mdrv_submit_fill(ctx, (void *)(uintptr_t)0x10000, (size_t)1 << 40, 0, &t),
                  MDRV_ERR_TOO_LONG, "fill longer than the device's maximum transfer");
    expect_status(fill(ctx, (void *)(uintptr_t)0x10000, 8, 0), MDRV_ERR_NO_MAPPING,
                  "fill at an address nothing is mapped at");

    expect_status(mdrv_submit_fill((mdrv_context *)(uintptr_t)0x1234, buf, 8, 0, &t),
                  MDRV_ERR_BAD_HANDLE, "a made-up context handle");
    expect_status(mdrv_submit_fill((mdrv_context *)(void *)buf, buf, 8, 0, &t),
                  MDRV_ERR_BAD_HANDLE, "a heap pointer as a context");
    expect_status(mdrv_submit_fill((mdrv_context *)(void *)dev, buf, 8, 0, &t),
                  MDRV_ERR_BAD_HANDLE, "a device handle as a context");
    expect_status(mdrv_context_create((mdrv_device *)(void *)ctx, &other), MDRV_ERR_BAD_HANDLE,
                  "a context handle as a device");
    expect_status(mdrv_context_destroy(NULL), MDRV_ERR_BAD_HANDLE, "destroy NULL");
    expect_status(mdrv_device_close(NULL), MDRV_ERR_BAD_HANDLE, "close NULL");

    expect_status(mdrv_wait(ctx, 987654321, NULL), MDRV_ERR_BAD_TICKET, "wait for a made-up ticket");
    must(mdrv_submit_fill(ctx, buf, 64, 9, &t), "submit");
    expect_status(mdrv_wait(other, t, NULL), MDRV_ERR_BAD_TICKET, "wait on another context's ticket");
    expect_status(mdrv_wait(ctx, t, NULL), MDRV_OK, "wait on its own context");
    expect_status(mdrv_wait(ctx, t, NULL), MDRV_ERR_BAD_TICKET, "wait for it a second time");

    expect_status(mdrv_device_close(dev), MDRV_ERR_BUSY, "close a device that has contexts");
    /* Destroy with a command in flight (its memory kept alive, as the rules say). */
    size_t big = 8 << 20;
    unsigned char *fresh = mmap(NULL, big, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t inflight;
    must(mdrv_submit_fill(other, fresh, big, 1, &inflight), "submit 8 MiB on the second context");
    expect_status(mdrv_context_destroy(other), MDRV_OK, "destroy it with the command in flight");
    expect_status(mdrv_wait(other, inflight, NULL), MDRV_ERR_BAD_HANDLE,
                  "wait on the destroyed context");
    must(mdrv_context_destroy(ctx), "destroy");
    expect_status(mdrv_submit_fill(ctx, buf, 8, 0, &t), MDRV_ERR_BAD_HANDLE,
                  "submit on a destroyed context");
    expect_status(mdrv_context_stats(ctx, &s), MDRV_ERR_BAD_HANDLE, "stats of a destroyed context");
    expect_status(mdrv_context_destroy(ctx), MDRV_ERR_BAD_HANDLE, "destroy it again");
    expect_status(mdrv_device_close(dev), MDRV_OK, "close the device once its contexts are gone");
    expect_status(mdrv_context_create(dev, &ctx), MDRV_ERR_BAD_HANDLE, "create on a closed device");
    expect_status(mdrv_device_close(dev), MDRV_ERR_BAD_HANDLE, "close it again");
    expect(strcmp(mdrv_status_name(-12345), "MDRV_UNKNOWN_STATUS") == 0, "an unknown status name");
    munmap(fresh, big);
    free(buf);
}

/* ---- limits: the mapped-bytes quota, and a wait that times out ---- */
static void case_limits(void) {
    mdrv_open_options o;
    must(mdrv_open_options_init(&o, sizeof o), "init");
    o.max_mapped_bytes = 256 << 10;
    mdrv_device *dev;
    must(mdrv_device_open(&o, &dev), "open with max_mapped_bytes 256 KiB");
    mdrv_context *ctx;
    must(mdrv_context_create(dev, &ctx), "create");
    size_t len = 4 << 20;
    unsigned char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    expect_status(fill(ctx, m, len, 1), MDRV_ERR_LIMIT, "a 4 MiB fill past a 256 KiB quota");
    expect(strstr(mdrv_last_error(), "max_mapped_bytes") != NULL,
           "... the message names the quota and what raises it");
    must(mdrv_context_destroy(ctx), "destroy");
    must(mdrv_device_close(dev), "close");
    munmap(m, len);

    /* pin_budget 256 KiB: the same 4 MiB fill succeeds, the context's cold mappings evicted
     * as the device moves on, never more than the budget mapped. */
    must(mdrv_open_options_init(&o, sizeof o), "init");
    o.pin_budget = 256 << 10;
    must(mdrv_device_open(&o, &dev), "open with pin_budget 256 KiB");
    must(mdrv_context_create(dev, &ctx), "create");
    m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    must(fill(ctx, m, len, 0x2929292929292929ull), "a 4 MiB fill under a 256 KiB pin budget");
    expect(all_bytes(m, len, 0x29), "... and every byte was written");
    mdrv_stats b;
    memset(&b, 0, sizeof b);
    b.size = sizeof b;
    must(mdrv_context_stats(ctx, &b), "stats");
    expect(b.evictions > 0, "cold mappings were evicted (stats.evictions)");
    expect(b.mapped_bytes <= (256u << 10), "no more than the budget is mapped");
    must(mdrv_context_destroy(ctx), "destroy");
    must(mdrv_device_close(dev), "close");
    munmap(m, len);

    /* timeout_ms 1: a 4 MiB fill of fresh memory (1024 device faults) cannot complete in time.
     * The wait must return MDRV_ERR_TIMEOUT only once the device can no longer write the
     * buffer: bytes written on the CPU after it returned stay as written. */
    must(mdrv_open_options_init(&o, sizeof o), "init");
    o.timeout_ms = 1;
    must(mdrv_device_open(&o, &dev), "open with timeout_ms 1");
    must(mdrv_context_create(dev, &ctx), "create");
    int timed_out = 0, intact = 1;
    for (int attempt = 0; attempt < 5 && !timed_out; attempt++) {
        m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        int st = fill(ctx, m, len, 0x0f0f0f0f0f0f0f0full);
        if (st == MDRV_ERR_TIMEOUT) {
            timed_out = 1;
            memset(m, 0xee, len); /* the memory is the caller's again */
            usleep(200 * 1000);
            intact = all_bytes(m, len, 0xee);
        } else if (st != MDRV_OK) {
            printf("   attempt %d: %s: %s\n", attempt, mdrv_status_name(st), mdrv_last_error());
        }
        munmap(m, len);
    }
    expect(timed_out, "a wait past timeout_ms returns MDRV_ERR_TIMEOUT");
    expect(intact, "nothing the device does after that wait returned reaches the memory");
    mdrv_stats s;
    memset(&s, 0, sizeof s);
    s.size = sizeof s;
    must(mdrv_context_stats(ctx, &s), "stats");
    expect(s.revocations >= 1, "the timed-out wait revoked the command's memory (stats.revocations)");
    must(mdrv_context_destroy(ctx), "destroy");
    must(mdrv_device_close(dev), "close");
}

/* ---- several threads submitting at once on one context ---- */
enum { THREADS = 8, ROUNDS = 40 };
struct worker {
    mdrv_context *ctx;
    int id;
    uint64_t *counter;
    int errors;
};

static void *work(void *arg) {
    struct worker *w = arg;
    size_t len = 64 << 10;
    unsigned char *buf = malloc(len);
    for (int r = 0; r < ROUNDS; r++) {
        unsigned char v = (unsigned char)(w->id * 16 + r % 16);
        uint64_t pattern = 0x0101010101010101ull * v, t;
        int st = mdrv_submit_fill(w->ctx, buf, len, pattern, &t);
        if (st == MDRV_OK) {
            if (r % 2) {
                while ((st = mdrv_poll(w->ctx, t, NULL)) == MDRV_PENDING) {
                }
            } else {
                st = mdrv_wait(w->ctx, t, NULL);
            }
        }
        if (st != MDRV_OK || !all_bytes(buf, len, v)) {
            printf("thread %d round %d: %s: %s\n", w->id, r, mdrv_status_name(st), mdrv_last_error());
            w->errors++;
        }
        st = mdrv_submit_atomic_add(w->ctx, w->counter, 1, &t);
        if (st == MDRV_OK) st = mdrv_wait(w->ctx, t, NULL);
        if (st != MDRV_OK) w->errors++;
    }
    free(buf);
    return NULL;
}

static void case_threads(void) {
    mdrv_device *dev = open_device(MDRV_DEVICE_EMULATED, NULL);
    mdrv_context *ctx;
    must(mdrv_context_create(dev, &ctx), "create");
    uint64_t *counter = aligned_alloc(8, 8);
    *counter = 0;
    pthread_t th[THREADS];
    struct worker w[THREADS];
    for (int i = 0; i < THREADS; i++) {
        w[i] = (struct worker){ctx, i, counter, 0};
        pthread_create(&th[i], NULL, work, &w[i]);
    }
    int errors = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        errors += w[i].errors;
    }
    expect(errors == 0, "8 threads x 40 fills (own buffers, checked) on one context, no error");
    expect(*counter == THREADS * ROUNDS, "8 threads x 40 device atomic adds on one counter: 320");
    must(mdrv_context_destroy(ctx), "destroy");
    must(mdrv_device_close(dev), "close");
    free(counter);
}

/* ---- one ticket, two threads; destroy while another thread waits ---- */
struct waiter {
    mdrv_context *ctx;
    uint64_t ticket;
    int status;
};

static void *wait_in_thread(void *arg) {
    struct waiter *w = arg;
    w->status = mdrv_wait(w->ctx, w->ticket, NULL);
    return NULL;
}

static void case_contended(void) {
    mdrv_device *dev = open_device(MDRV_DEVICE_EMULATED, NULL);
    mdrv_context *ctx;
    must(mdrv_context_create(dev, &ctx), "create");
    size_t len = 64u << 20; /* first touch of 16384 pages: far longer than the 50 ms below */
    unsigned char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    expect(buf != MAP_FAILED, "mmap 64 MiB");
    struct waiter w = {ctx, 0, 0};
    must(mdrv_submit_fill(ctx, buf, len, 0x3c3c3c3c3c3c3c3cull, &w.ticket), "submit 64 MiB");
    pthread_t th;
    pthread_create(&th, NULL, wait_in_thread, &w);
    usleep(50 * 1000);
    /* The other thread's wait holds the ticket: this is a refusal, not "collected". */
    expect_status(mdrv_poll(ctx, w.ticket, NULL), MDRV_ERR_BUSY, "poll a ticket another thread waits for");
    expect_status(mdrv_wait(ctx, w.ticket, NULL), MDRV_ERR_BUSY, "wait for a ticket another thread waits for");
    pthread_join(th, NULL);
    expect_status(w.status, MDRV_OK, "the first waiter collects the fill");
    expect(all_bytes(buf, len, 0x3c), "the fill's pattern on the CPU");
    expect_status(mdrv_poll(ctx, w.ticket, NULL), MDRV_ERR_BAD_TICKET, "then it is collected");

    /* Destroy while another thread waits: destroy returns after that wait returned and the
       context is released, so closing the device right after it is not refused. */
    memset(buf, 0, len);
    madvise(buf, len, MADV_DONTNEED);
    w.status = 0;
    must(mdrv_submit_fill(ctx, buf, len, 0x5a5a5a5a5a5a5a5aull, &w.ticket), "submit 64 MiB again");
    pthread_create(&th, NULL, wait_in_thread, &w);
    usleep(20 * 1000);
    must(mdrv_context_destroy(ctx), "destroy while another thread waits");
    expect_status(mdrv_device_close(dev), MDRV_OK, "close right after that destroy");
    pthread_join(th, NULL);
    expect(w.status == MDRV_OK || w.status < 0, "the waiter returned (a result or an error)");
    munmap(buf, len);
}

/* ---- a daemon client ---- */
struct daemon_worker {
    mdrv_context *ctx;
    unsigned char *mem;
    size_t len;
    int polls;
    int errors;
    long slowest_us;
};

static long now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000L + ts.tv_nsec / 1000;
}

static void *daemon_work(void *arg) {
    struct daemon_worker *w = arg;
    for (int r = 0; r < 30; r++) {
        unsigned char v = (unsigned char)(0x10 + r);
        uint64_t t;
        int st = mdrv_submit_fill(w->ctx, w->mem, w->len, 0x0101010101010101ull * v, &t);
        while (st == MDRV_OK || st == MDRV_PENDING) {
            long started = now_us();
            st = w->polls ? mdrv_wait_for(w->ctx, t, 5, NULL) : mdrv_wait(w->ctx, t, NULL);
            long took = now_us() - started;
            if (took > w->slowest_us) w->slowest_us = took;
            if (st != MDRV_PENDING) break;
        }
        if (st != MDRV_OK || !all_bytes(w->mem, w->len, v)) {
            printf("daemon worker round %d: %s: %s\n", r, mdrv_status_name(st), mdrv_last_error());
            w->errors++;
            return NULL;
        }
    }
    return NULL;
}

static void case_daemon(const char *socket) {
    mdrv_device *dev = open_device(MDRV_DEVICE_DAEMON, socket);
    mdrv_context *ctx;
    must(mdrv_context_create(dev, &ctx), "mdrv_context_create (a daemon session)");
    size_t len = 1 << 20;
    unsigned char *arena = NULL;
    must(mdrv_arena_alloc(ctx, len, (void **)&arena), "mdrv_arena_alloc 1 MiB");
    unsigned char tag = (unsigned char)(getpid() & 0x7f);
    expect_status(fill(ctx, arena, len, 0x0101010101010101ull * tag), MDRV_OK, "fill the arena");
    expect(all_bytes(arena, len, tag), "the arena reads the pattern on the CPU");
    uint64_t t, sum = 0;
    expect_status(run(ctx, mdrv_submit_checksum(ctx, arena, len, &t), &t, &sum), MDRV_OK,
                  "checksum the arena");
    expect(sum == fnv1a(arena, len), "device checksum == CPU FNV-1a");
    uint64_t *counter = (uint64_t *)(void *)(arena + 64);
    *counter = 5;
    uint64_t old = 0;
    expect_status(run(ctx, mdrv_submit_atomic_add(ctx, counter, 10, &t), &t, &old), MDRV_OK,
                  "atomic add in the arena");
    expect(old == 5 && *counter == 15, "old value 5, new 15");

    unsigned char *priv = malloc(PAGE);
    expect_status(fill(ctx, priv, PAGE, 1), MDRV_ERR_CANCELLED,
                  "fill private malloc'd memory (the daemon cannot reach it)");
    must(mdrv_submit_fill(ctx, arena, len, 0x0202020202020202ull, &t), "submit a 1 MiB fill");
    int st;
    unsigned long polls = 0;
    while ((st = mdrv_poll(ctx, t, NULL)) == MDRV_PENDING) polls++;
    expect_status(st, MDRV_OK, "mdrv_poll on a daemon context until the fill completed");
    expect(all_bytes(arena, len, 2), "the polled fill's pattern on the CPU");
    printf("   daemon poll: %lu polls returned MDRV_PENDING first\n", polls);
    expect_status(mdrv_poll(ctx, t, NULL), MDRV_ERR_BAD_TICKET, "poll a collected daemon ticket");
    must(mdrv_submit_fill(ctx, arena, 64, 3, &t), "submit");
    do st = mdrv_wait_for(ctx, t, 1, NULL); while (st == MDRV_PENDING);
    expect_status(st, MDRV_OK, "mdrv_wait_for(1 ms) on a daemon context until it completed");
    must(mdrv_submit_fill(ctx, arena, 64, 2, &t), "submit");
    expect_status(mdrv_wait(ctx, t, NULL), MDRV_OK, "wait for it");
    {
        /* Two threads on one daemon session: one polls large fills in 5 ms slices, the other
           runs small fills; neither holds the other up for long or breaks the session. */
        struct daemon_worker dw[2] = {{ctx, arena, len / 2, 1, 0, 0}, {ctx, arena + len / 2, 4096, 0, 0, 0}};
        pthread_t th[2];
        for (int i = 0; i < 2; i++) pthread_create(&th[i], NULL, daemon_work, &dw[i]);
        for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
        printf("   daemon, two threads: errors %d + %d, slowest call %.1f ms\n", dw[0].errors,
               dw[1].errors, (dw[0].slowest_us > dw[1].slowest_us ? dw[0].slowest_us : dw[1].slowest_us) / 1000.0);
        expect(dw[0].errors == 0 && dw[1].errors == 0, "two threads on one daemon context, no error");
    }
    expect_status(mdrv_munmap(ctx, arena, PAGE), MDRV_ERR_UNSUPPORTED, "munmap on a daemon context");
    expect_status(mdrv_invalidate(ctx, arena, len), MDRV_OK, "invalidate an arena");

    mdrv_stats s;
    memset(&s, 0, sizeof s);
    s.size = sizeof s;
    must(mdrv_context_stats(ctx, &s), "stats");
    printf("   stats: faults %" PRIu64 ", pages mapped %" PRIu64 ", commands %" PRIu64 "\n",
           s.faults, s.pages_mapped, s.commands);
    expect(s.commands >= 5 && s.pages_mapped > 0, "the session's statistics count its work");
    expect_status(mdrv_arena_free(ctx, priv), MDRV_ERR_INVALID_ARGUMENT, "free a non-arena");
    expect_status(mdrv_arena_free(ctx, arena), MDRV_OK, "free the arena");
    must(mdrv_context_destroy(ctx), "destroy (ends the session)");
    must(mdrv_device_close(dev), "close");
    free(priv);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: capi_test data|strict|args|limits|threads|contended|daemon [ARGS]\n");
        return 2;
    }
    case_name = argv[1];
    if (strcmp(argv[1], "data") == 0) {
        if (argc >= 4 && strcmp(argv[2], "vfio-user") == 0)
            case_data(MDRV_DEVICE_VFIO_USER, argv[3]);
        else
            case_data(MDRV_DEVICE_EMULATED, NULL);
    } else if (strcmp(argv[1], "strict") == 0) {
        case_strict();
    } else if (strcmp(argv[1], "args") == 0) {
        case_args();
    } else if (strcmp(argv[1], "limits") == 0) {
        case_limits();
    } else if (strcmp(argv[1], "contended") == 0) {
        case_contended();
    } else if (strcmp(argv[1], "threads") == 0) {
        case_threads();
    } else if (strcmp(argv[1], "daemon") == 0 && argc >= 3) {
        case_daemon(argv[2]);
    } else {
        fprintf(stderr, "unknown case %s\n", argv[1]);
        return 2;
    }
    return finish();
}
