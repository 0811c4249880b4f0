/* LD_PRELOAD'ed into a process that dies of SIGSEGV: prints the native stack (dladdr names) to stderr, then
   dies as it would have. The device host has no gdb; this is how the AOTInductor loader's crash was located.
   gcc -shared -fPIC -O0 -o /tmp/segv.so benchmarks/device/segv_backtrace.c */
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void on_segv(int sig, siginfo_t *info, void *ctx) {
    (void)ctx;
    void *frames[64];
    char line[96];
    int n = backtrace(frames, 64);
    int len = 0;
    const char *head = "segv_backtrace: fault at ";
    write(2, head, strlen(head));
    unsigned long addr = (unsigned long)info->si_addr;
    char hex[20];
    for (int i = 15; i >= 0; i--) { hex[15 - i] = "0123456789abcdef"[(addr >> (4 * i)) & 15]; }
    hex[16] = '\n';
    write(2, hex, 17);
    (void)line; (void)len;
    backtrace_symbols_fd(frames, n, 2);
    signal(sig, SIG_DFL);
    raise(sig);
}

__attribute__((constructor)) static void install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, NULL);
}
