// The header from C++17: compiled with c++ -std=c++17 -Wall -Werror and run by
// tests/c_programs.rs. Fills a std::vector on the embedded emulated device.
#include <cstdio>
#include <thread>
#include <vector>

#include "mirrordrv.h"

// A runtime's per-thread cleanup calling the library from a thread_local destructor, after
// the library's own per-thread state may be gone: an error, never an abort.
struct PerThread {
    int status = MDRV_OK;
    ~PerThread() { status = mdrv_context_destroy(nullptr); }
};
thread_local PerThread per_thread;

int main() {
    std::thread cleanup([] {
        per_thread.status = MDRV_OK;  // constructs it: its destructor is registered first
        mdrv_device_close(nullptr);   // a failing call: the library's last error exists now
    });
    cleanup.join();

    mdrv_open_options opts{};
    mdrv_device *dev = nullptr;
    mdrv_context *ctx = nullptr;
    if (mdrv_open_options_init(&opts, sizeof opts) != MDRV_OK || mdrv_device_open(&opts, &dev) != MDRV_OK ||
        mdrv_context_create(dev, &ctx) != MDRV_OK) {
        std::fprintf(stderr, "open: %s\n", mdrv_last_error());
        return 1;
    }
    std::vector<unsigned char> v(100000, 0);
    uint64_t ticket = 0;
    int st = mdrv_submit_fill(ctx, v.data(), v.size(), 0x2a2a2a2a2a2a2a2aull, &ticket);
    if (st == MDRV_OK) st = mdrv_wait(ctx, ticket, nullptr);
    bool good = st == MDRV_OK;
    for (unsigned char b : v) good = good && b == 0x2a;
    std::printf("c++ smoke: %s (%s); a call from a thread_local destructor returned\n",
                good ? "ok" : "FAIL", mdrv_status_name(st));
    mdrv_context_destroy(ctx);
    mdrv_device_close(dev);
    return good ? 0 : 1;
}
