/* wasmshim: one native call per edge-function invocation, and a native epoch ticker.
 *
 * Why: a hello-world invocation is ~17 us of wasmtime work, but driving it from Python through
 * ctypes (18 C calls, their argument conversions, the Python around them) cost ~140 us of CPU;
 * and a Python epoch ticker needs the GIL 500 times a second. Here the whole invocation (store,
 * limits, deadline, WASI context, instantiate, _start, exit status, memory size, drop, the
 * capture of stdout) is one C call that Python makes with the GIL released (ctypes.CDLL), and the ticker
 * is a pthread that never touches Python. What Python would otherwise do per request around
 * that call is done here too, where it costs little: the environment arrays are built from one
 * NUL-joined string of the request's variables (the per-function ones come prebuilt), the end
 * of the CGI head in stdout is found, and the run's CPU time is measured.
 *
 * Output capture (ABI 3): a function's stdout and stderr are not files. The linker its
 * modules are pre-linked with (vs_define_capture) has WASI's fd_write shadowed by a native
 * function that appends fds 1 and 2 to the invoking thread's buffers (up to the function's
 * caps; what is past them is counted, not kept), with wasmtime-wasi's semantics (errnos, traps:
 * tests/compute/test_native.py compares them). Files cost ~30-40 us per request (open with
 * truncation and close of two files, the write through wasmtime-wasi's stream, the reads):
 * in process, CPU per hello request went ~95 -> ~50 us (bench/compute_cpu.py).
 *
 * Built against the libwasmtime bundled in the wasmtime wheel (no headers ship with it, so the
 * few prototypes used are declared here, from wasmtime's crates/c-api/include; the wheel's
 * version is pinned by verge/compat/wasmtime.py). Struct layouts of wasmtime values
 * (wasmtime_instance_t, wasmtime_extern_t) are not assumed: they live in opaque buffers whose
 * sizes and the offset of the extern's payload Python checks and passes in (vs_thread_new).
 *
 * Build: native/wasmshim/build.sh OUT.so LIBWASMTIME_DIR (verge.compat.wasmtime does it on
 * first use). Only for modules without host imports: the Python path handles those.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------ wasmtime's C API (50.x) */
typedef struct wasm_engine_t wasm_engine_t;
typedef struct wasmtime_store wasmtime_store_t;
typedef struct wasmtime_context wasmtime_context_t;
typedef struct wasmtime_error wasmtime_error_t;
typedef struct wasm_trap_t wasm_trap_t;
typedef struct wasi_config_t wasi_config_t;
typedef struct wasmtime_instance_pre wasmtime_instance_pre_t;
typedef struct {
    size_t size;
    uint8_t *data;
} wasm_byte_vec_t;

extern wasmtime_store_t *wasmtime_store_new(wasm_engine_t *, void *, void (*)(void *));
extern wasmtime_context_t *wasmtime_store_context(wasmtime_store_t *);
extern void wasmtime_store_limiter(wasmtime_store_t *, int64_t memory_size,
                                   int64_t table_elements, int64_t instances, int64_t tables,
                                   int64_t memories);
extern void wasmtime_store_delete(wasmtime_store_t *);
extern void wasmtime_context_set_epoch_deadline(wasmtime_context_t *, uint64_t);
extern wasmtime_error_t *wasmtime_context_set_wasi(wasmtime_context_t *, wasi_config_t *);
extern wasi_config_t *wasi_config_new(void);
extern void wasi_config_delete(wasi_config_t *);
extern bool wasi_config_set_env(wasi_config_t *, size_t, const char *const *,
                                const char *const *);
extern bool wasi_config_set_argv(wasi_config_t *, size_t, const char *const *);
extern void wasm_byte_vec_new(wasm_byte_vec_t *, size_t, const uint8_t *);
extern void wasi_config_set_stdin_bytes(wasi_config_t *, wasm_byte_vec_t *);
extern bool wasi_config_set_stdout_file(wasi_config_t *, const char *);
extern bool wasi_config_set_stderr_file(wasi_config_t *, const char *);
extern wasmtime_error_t *wasmtime_instance_pre_instantiate(const wasmtime_instance_pre_t *,
                                                           wasmtime_context_t *, void *instance,
                                                           wasm_trap_t **);
extern bool wasmtime_instance_export_get(wasmtime_context_t *, const void *instance,
                                         const char *, size_t, void *item);
extern wasmtime_error_t *wasmtime_func_call(wasmtime_context_t *, const void *func,
                                            const void *args, size_t, void *results, size_t,
                                            wasm_trap_t **);
extern size_t wasmtime_memory_data_size(const wasmtime_context_t *, const void *memory);
extern bool wasmtime_error_exit_status(const wasmtime_error_t *, int *);
extern void wasmtime_error_delete(wasmtime_error_t *);
extern void wasmtime_engine_increment_epoch(wasm_engine_t *);
extern wasmtime_error_t *wasmtime_error_new(const char *);
typedef struct wasmtime_linker wasmtime_linker_t;
typedef struct wasmtime_caller wasmtime_caller_t;
typedef struct wasm_functype_t wasm_functype_t;
typedef struct wasm_valtype_t wasm_valtype_t;
typedef struct {
    size_t size;
    wasm_valtype_t **data;
} wasm_valtype_vec_t;
typedef union {
    int32_t i32;
    int64_t i64;
    uint8_t v128[16];
} vs_val_raw; /* wasmtime_val_raw_t: 16 bytes */
typedef wasm_trap_t *(*vs_unchecked_callback)(void *, wasmtime_caller_t *, vs_val_raw *,
                                              size_t);
extern void wasmtime_linker_allow_shadowing(wasmtime_linker_t *, bool);
extern wasmtime_error_t *wasmtime_linker_define_func_unchecked(
    wasmtime_linker_t *, const char *, size_t, const char *, size_t, const wasm_functype_t *,
    vs_unchecked_callback, void *, void (*)(void *));
extern wasm_valtype_t *wasm_valtype_new(uint8_t kind);
extern void wasm_valtype_vec_new(wasm_valtype_vec_t *, size_t, wasm_valtype_t *const[]);
extern wasm_functype_t *wasm_functype_new(wasm_valtype_vec_t *params, wasm_valtype_vec_t *results);
extern void wasm_functype_delete(wasm_functype_t *);
extern wasmtime_context_t *wasmtime_caller_context(wasmtime_caller_t *);
extern bool wasmtime_caller_export_get(wasmtime_caller_t *, const char *, size_t, void *item);
extern uint8_t *wasmtime_memory_data(const wasmtime_context_t *, const void *memory);
extern wasm_trap_t *wasmtime_trap_new(const char *, size_t);
typedef uint8_t wasmtime_update_deadline_kind_t; /* 0: WASMTIME_UPDATE_DEADLINE_CONTINUE */
typedef wasmtime_error_t *(*vs_deadline_callback)(wasmtime_context_t *, void *, uint64_t *,
                                                   wasmtime_update_deadline_kind_t *);
extern void wasmtime_store_epoch_deadline_callback(wasmtime_store_t *, vs_deadline_callback,
                                                   void *, void (*)(void *));

#define VS_ABI 3
int vs_abi(void) { return VS_ABI; }

/* ------------------------------------------------------------------ the epoch ticker */

/* Bumps the engine's epoch every `tick_ns` while invocations run; parks after `idle_ticks`
 * ticks with none (an idle node does not wake 500 times a second); vs_ticker_enter wakes it.
 * The schedule is the Python ticker's: on a fixed grid, one bump per wake, a late wake skips
 * the grid points it missed (no catching up in a burst). Runs made by vs_run do not rely on
 * it for "never stopped before cpu_ms": their deadline callback checks the clock. */
typedef struct vs_ticker {
    wasm_engine_t *engine;
    uint64_t tick_ns;
    uint64_t idle_ticks;
    atomic_long running;
    atomic_ulong entries;
    atomic_int parked;
    atomic_int stop;
    atomic_ulong bumps;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t thread;
} vs_ticker;

static void add_ns(struct timespec *t, uint64_t ns) {
    uint64_t total = (uint64_t)t->tv_nsec + ns;
    t->tv_sec += (time_t)(total / 1000000000u);
    t->tv_nsec = (long)(total % 1000000000u);
}

static void *ticker_main(void *arg) {
    vs_ticker *t = arg;
    unsigned long seen = (unsigned long)-1;
    uint64_t idle = 0;
    struct timespec next, now;
    clock_gettime(CLOCK_MONOTONIC, &next);
    add_ns(&next, t->tick_ns);
    while (!atomic_load(&t->stop)) {
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR) {
        }
        if (atomic_load(&t->stop)) break;
        wasmtime_engine_increment_epoch(t->engine);
        atomic_fetch_add(&t->bumps, 1);
        add_ns(&next, t->tick_ns);
        clock_gettime(CLOCK_MONOTONIC, &now);
        while (next.tv_sec < now.tv_sec ||
               (next.tv_sec == now.tv_sec && next.tv_nsec <= now.tv_nsec))
            add_ns(&next, t->tick_ns); /* (woke late: skip the grid points missed) */
        unsigned long entries = atomic_load(&t->entries);
        if (entries != seen || atomic_load(&t->running) > 0) {
            seen = entries;
            idle = 0;
            continue;
        }
        if (++idle < t->idle_ticks) continue;
        pthread_mutex_lock(&t->lock);
        atomic_store(&t->parked, 1);
        while (atomic_load(&t->entries) == seen && !atomic_load(&t->stop))
            pthread_cond_wait(&t->wake, &t->lock);
        atomic_store(&t->parked, 0);
        pthread_mutex_unlock(&t->lock);
        idle = 0;
        clock_gettime(CLOCK_MONOTONIC, &next);
        add_ns(&next, t->tick_ns);
    }
    return NULL;
}

vs_ticker *vs_ticker_start(wasm_engine_t *engine, uint64_t tick_ns, uint64_t idle_ticks) {
    vs_ticker *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->engine = engine;
    t->tick_ns = tick_ns ? tick_ns : 1;
    t->idle_ticks = idle_ticks ? idle_ticks : 1;
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->wake, NULL);
    if (pthread_create(&t->thread, NULL, ticker_main, t) != 0) {
        free(t);
        return NULL;
    }
    return t;
}

void vs_ticker_enter(vs_ticker *t) {
    atomic_fetch_add(&t->running, 1);
    atomic_fetch_add(&t->entries, 1);
    if (atomic_load(&t->parked)) {
        pthread_mutex_lock(&t->lock);
        pthread_cond_signal(&t->wake);
        pthread_mutex_unlock(&t->lock);
    }
}

void vs_ticker_leave(vs_ticker *t) { atomic_fetch_sub(&t->running, 1); }

int vs_ticker_parked(vs_ticker *t) { return atomic_load(&t->parked); }

unsigned long vs_ticker_bumps(vs_ticker *t) { return atomic_load(&t->bumps); }

/* Stop and join the thread (once; the engine must outlive this call). The ticker itself
 * stays valid (enter/leave still work, nothing ticks) until vs_ticker_free. */
void vs_ticker_stop(vs_ticker *t) {
    pthread_mutex_lock(&t->lock);
    int stopped = atomic_exchange(&t->stop, 1);
    pthread_cond_signal(&t->wake);
    pthread_mutex_unlock(&t->lock);
    if (!stopped) pthread_join(t->thread, NULL);
}

void vs_ticker_free(vs_ticker *t) {
    if (!t) return;
    vs_ticker_stop(t);
    pthread_mutex_destroy(&t->lock);
    pthread_cond_destroy(&t->wake);
    free(t);
}

/* ------------------------------------------------------------------ invocations */

/* A deployed function: what each of its runs needs that does not change per request. Python
 * makes one per function (a ctypes structure it keeps alive, with the arrays it points to).
 * A run's environment is the request's (vs_invoke's blob: `named_count` values whose names
 * are `named`, then name/value pairs), then the function's own variables (`env_*`). */
typedef struct {
    const wasmtime_instance_pre_t *pre;
    int64_t memory_bytes;
    const char *const *argv;
    size_t argc;
    const char *const *named;
    size_t named_count;
    const char *const *env_names;
    const char *const *env_values;
    size_t env_count;
    size_t stdout_keep; /* stdout bytes kept (max_response_bytes + 1); the rest is counted */
    size_t stderr_keep; /* stderr bytes kept (max_stderr_bytes + 1) */
} vs_function;

enum { /* vs_thread.out[VS_STATUS] */
       VS_RAN = 0,          /* _start returned or exited: out[VS_EXIT_CODE] */
       VS_SETUP = 1,        /* environment not UTF-8 or malformed, output files, WASI context */
       VS_INSTANTIATE = 2,  /* instantiation failed: out[VS_ERROR] or out[VS_TRAP] */
       VS_START = 3,        /* _start failed: out[VS_ERROR] or out[VS_TRAP] */
       VS_EXPORTS = 4,      /* no memory or _start export */
       VS_TIMEOUT = 5,      /* stopped at its time budget (the deadline callback) */
};
enum { VS_STATUS, VS_EXIT_CODE, VS_ERROR, VS_TRAP, VS_MEMORY, VS_STDOUT_LEN, VS_STDERR_SIZE,
       VS_HEAD_END, VS_BODY_AT, VS_CPU_NS, VS_WALL_NS, VS_STDOUT_AT, VS_STDERR_AT,
       VS_STDOUT_KEPT, VS_STDERR_KEPT, VS_OUT_FIELDS };
/* out[VS_STDOUT_LEN] and out[VS_STDERR_SIZE] are the bytes written; the first of them (up to
 * the function's caps: out[VS_STDOUT_KEPT], out[VS_STDERR_KEPT]) are at the addresses
 * out[VS_STDOUT_AT] and out[VS_STDERR_AT], valid until the thread's next invocation. */

/* Where a stream's bytes go: a fixed buffer first (stdout: the caller's), then the heap. */
typedef struct {
    uint8_t *data;  /* fixed, or a heap copy once the bytes outgrew it */
    size_t kept;    /* bytes in data */
    size_t room;    /* data's size */
    size_t total;   /* bytes written, kept or not */
    size_t keep;    /* at most this many are kept */
    uint8_t *fixed; /* may be NULL */
    size_t fixed_room;
} vs_sink;

#define VS_ITEM_BYTES 64 /* room for a wasmtime_instance_t / wasmtime_extern_t (checked) */

/* Per thread: the engine, where outputs go, and where results come back. */
typedef struct vs_thread {
    wasm_engine_t *engine;
    vs_ticker *ticker; /* may be NULL */
    size_t extern_of;  /* offsetof(wasmtime_extern_t, of) */
    vs_sink out_sink, err_sink; /* the run's stdout and stderr (vs_define_capture) */
    wasmtime_context_t *context; /* the running store's, while vs_invoke runs */
    size_t head_limit; /* a CGI head ends within this many bytes (wagi.MAX_HEAD_BYTES) */
    const char **env_names, **env_values; /* the request's environment, grown as needed */
    size_t env_capacity;
    uint64_t budget_end; /* CLOCK_MONOTONIC ns at which the run's time is up */
    int timed_out;
    int64_t out[VS_OUT_FIELDS];
    _Alignas(16) unsigned char instance[VS_ITEM_BYTES];
    _Alignas(16) unsigned char memory[VS_ITEM_BYTES];
    _Alignas(16) unsigned char start[VS_ITEM_BYTES];
} vs_thread;

/* `buffer` (`capacity` bytes: stdout's first bytes go there) is the caller's and must stay
 * alive as long as the vs_thread. */
vs_thread *vs_thread_new(wasm_engine_t *engine, vs_ticker *ticker, size_t extern_of,
                         size_t item_bytes, uint8_t *buffer, size_t capacity,
                         size_t head_limit) {
    if (item_bytes > VS_ITEM_BYTES || extern_of >= item_bytes) return NULL;
    vs_thread *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->engine = engine;
    t->ticker = ticker;
    t->extern_of = extern_of;
    t->out_sink.fixed = t->out_sink.data = buffer;
    t->out_sink.fixed_room = t->out_sink.room = capacity;
    t->head_limit = head_limit;
    return t;
}

void vs_thread_free(vs_thread *t) {
    if (!t) return;
    free(t->env_names);
    free(t->env_values);
    if (t->out_sink.data != t->out_sink.fixed) free(t->out_sink.data);
    if (t->err_sink.data != t->err_sink.fixed) free(t->err_sink.data);
    free(t);
}

int64_t *vs_thread_out(vs_thread *t) { return t->out; }

static uint64_t clock_ns(clockid_t clock) {
    struct timespec now;
    clock_gettime(clock, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

static uint64_t monotonic_ns(void) { return clock_ns(CLOCK_MONOTONIC); }

/* Where the CGI head of `data` ends, as wagi._head_end says: the offset of the blank line
 * (its length, 1 or 2, in *sep), or -1 when there is none within the first `limit` bytes. */
int64_t vs_head_end(const uint8_t *data, size_t len, size_t limit, int64_t *sep) {
    *sep = 0;
    if (len >= 1 && data[0] == '\n') {
        *sep = 1;
        return 0;
    }
    if (len >= 2 && data[0] == '\r' && data[1] == '\n') {
        *sep = 2;
        return 0;
    }
    size_t n = len < limit ? len : limit;
    for (const uint8_t *p = data; (p = memchr(p, '\n', n - (size_t)(p - data))) != NULL; p++) {
        size_t i = (size_t)(p - data);
        if (i + 1 < n && data[i + 1] == '\n') {
            *sep = 1;
            return (int64_t)i + 1;
        }
        if (i + 2 < n && data[i + 1] == '\r' && data[i + 2] == '\n') {
            *sep = 2;
            return (int64_t)i + 1;
        }
    }
    return -1;
}

/* ------------------------------------------------------------------ output capture */

/* Empty the sink for a run that keeps up to `keep` bytes (a heap copy is given back). */
static void sink_reset(vs_sink *s, size_t keep) {
    if (s->data != s->fixed) {
        free(s->data);
        s->data = s->fixed;
        s->room = s->fixed_room;
    }
    s->kept = s->total = 0;
    s->keep = keep;
}

/* Append what fits under the sink's `keep`; false when memory for it cannot be had. */
static bool sink_add(vs_sink *s, const uint8_t *bytes, size_t len) {
    s->total += len;
    size_t take = s->keep - s->kept < len ? s->keep - s->kept : len;
    if (!take) return true;
    if (s->kept + take > s->room) {
        size_t room = s->room ? s->room : 4096;
        while (room < s->kept + take) room *= 2;
        if (room > s->keep) room = s->keep;
        uint8_t *data;
        if (s->data == s->fixed) {
            data = malloc(room);
            if (data && s->kept) memcpy(data, s->data, s->kept);
        } else {
            data = realloc(s->data, room);
        }
        if (!data) return false;
        s->data = data;
        s->room = room;
    }
    memcpy(s->data + s->kept, bytes, take);
    s->kept += take;
    return true;
}

static __thread vs_thread *vs_current; /* the thread's running invocation (vs_invoke) */

enum { WASI_SUCCESS = 0, WASI_EBADF = 8, WASI_ENOMEM = 48 };
#define VS_EXTERN_MEMORY 3 /* WASMTIME_EXTERN_MEMORY: wasmtime_extern_t.kind, its first byte */
#define VS_WRITE_MAX 0x7fffff8u /* a longer buffer: ENOMEM from wasmtime-wasi (measured) */

/* The trap wasmtime-wasi raises for a guest address out of bounds (the same message). */
static wasm_trap_t *out_of_bounds(uint64_t start, uint64_t len) {
    char message[96];
    int n = snprintf(message, sizeof message,
                     "Pointer out of bounds: Region { start: %llu, len: %llu }",
                     (unsigned long long)start, (unsigned long long)len);
    return wasmtime_trap_new(message, (size_t)n);
}

/* WASI's fd_write(fd, iovs, iovs_len, nwritten) -> errno, for vs_define_capture, with
 * wasmtime-wasi's semantics: only the first non-empty buffer is written (the guest's libc
 * writes the rest in later calls), and a guest address out of bounds is a trap. fds 1 and 2
 * go to the running invocation's sinks; any other fd (the store has no other writable one:
 * no preopens; stdin is read-only), or a store that is not vs_invoke's, gets EBADF. */
static wasm_trap_t *capture_fd_write(void *env, wasmtime_caller_t *caller, vs_val_raw *args,
                                     size_t nargs) {
    (void)env;
    (void)nargs;
    vs_thread *t = vs_current;
    wasmtime_context_t *cx = wasmtime_caller_context(caller);
    int32_t fd = args[0].i32;
    uint32_t iovs = (uint32_t)args[1].i32, count = (uint32_t)args[2].i32;
    uint32_t nwritten_at = (uint32_t)args[3].i32;
    _Alignas(16) unsigned char item[VS_ITEM_BYTES];
    args[0].i64 = 0;
    if (!t || t->context != cx || (fd != 1 && fd != 2) ||
        !wasmtime_caller_export_get(caller, "memory", 6, item) ||
        item[0] != VS_EXTERN_MEMORY) { /* (loading checked the kind: defence in depth) */
        args[0].i32 = WASI_EBADF;
        return NULL;
    }
    const void *memory = item + t->extern_of;
    uint8_t *base = wasmtime_memory_data(cx, memory);
    uint64_t size = wasmtime_memory_data_size(cx, memory);
    uint32_t iov[2] = {0, 0};
    for (uint32_t i = 0; i < count && !iov[1]; i++) {
        uint64_t at = (uint64_t)iovs + 8u * (uint64_t)i;
        if (at + 4 > size) return out_of_bounds(at, 4);
        if (at + 8 > size) return out_of_bounds(at + 4, 4);
        memcpy(iov, base + at, sizeof iov);
    }
    if (iov[1] > VS_WRITE_MAX) { /* (before the bounds, as wasmtime-wasi checks) */
        args[0].i32 = WASI_ENOMEM;
        return NULL;
    }
    if (iov[1]) {
        if ((uint64_t)iov[0] + iov[1] > size) return out_of_bounds(iov[0], iov[1]);
        if (!sink_add(fd == 1 ? &t->out_sink : &t->err_sink, base + iov[0], iov[1])) {
            args[0].i32 = WASI_ENOMEM;
            return NULL;
        }
    }
    if ((uint64_t)nwritten_at + 4 > size) return out_of_bounds(nwritten_at, 4);
    memcpy(base + nwritten_at, &iov[1], sizeof iov[1]);
    args[0].i32 = WASI_SUCCESS;
    return NULL;
}

/* Shadow WASI's fd_write in `linker` (after its WASI definitions) with capture_fd_write:
 * the modules pre-linked by it run only through vs_invoke. NULL, or the error. */
wasmtime_error_t *vs_define_capture(wasmtime_linker_t *linker) {
    wasm_valtype_t *params[4], *results[1];
    for (int i = 0; i < 4; i++) params[i] = wasm_valtype_new(0); /* WASM_I32 */
    results[0] = wasm_valtype_new(0);
    wasm_valtype_vec_t param_vec, result_vec;
    wasm_valtype_vec_new(&param_vec, 4, params);
    wasm_valtype_vec_new(&result_vec, 1, results);
    wasm_functype_t *type = wasm_functype_new(&param_vec, &result_vec);
    wasmtime_linker_allow_shadowing(linker, true);
    static const char module[] = "wasi_snapshot_preview1", name[] = "fd_write";
    wasmtime_error_t *error = wasmtime_linker_define_func_unchecked(
        linker, module, sizeof module - 1, name, sizeof name - 1, type, capture_fd_write, NULL,
        NULL);
    wasmtime_linker_allow_shadowing(linker, false);
    wasm_functype_delete(type);
    return error;
}

/* Room for `count` variables in the thread's environment arrays. */
static bool reserve_env(vs_thread *t, size_t count) {
    if (count <= t->env_capacity) return true;
    size_t capacity = count < 64 ? 64 : count * 2;
    const char **names = realloc(t->env_names, capacity * sizeof *names);
    if (names) t->env_names = names;
    const char **values = realloc(t->env_values, capacity * sizeof *values);
    if (values) t->env_values = values;
    if (!names || !values) return false;
    t->env_capacity = capacity;
    return true;
}

/* The request's environment from `blob`: NUL-separated strings (blob[len] is a NUL too): the
 * values of fn->named, then name/value pairs. Into the thread's arrays (pointers into the
 * blob); their count, or -1 when the blob does not have that shape. */
static ptrdiff_t split_env(vs_thread *t, const vs_function *fn, const char *blob, size_t len) {
    size_t strings = 1;
    for (const char *p = blob; (p = memchr(p, '\0', len - (size_t)(p - blob))) != NULL; p++)
        strings++;
    if (strings < fn->named_count || (strings - fn->named_count) % 2) return -1;
    size_t count = fn->named_count + (strings - fn->named_count) / 2;
    if (!reserve_env(t, count)) return -1;
    const char *p = blob;
    for (size_t i = 0; i < count; i++) {
        if (i < fn->named_count) {
            t->env_names[i] = fn->named[i];
        } else {
            t->env_names[i] = p;
            p += strlen(p) + 1;
        }
        t->env_values[i] = p;
        p += strlen(p) + 1;
    }
    return (ptrdiff_t)count;
}

/* The epoch deadline (one tick) passed: stop the run if its time is really up, else go on
 * for one more tick. So a run is stopped at the first tick after its budget, never before,
 * however the ticker was scheduled (late wakes, skipped ticks, a busy host). */
static wasmtime_error_t *on_deadline(wasmtime_context_t *cx, void *data, uint64_t *delta,
                                     wasmtime_update_deadline_kind_t *kind) {
    (void)cx;
    vs_thread *t = data;
    if (monotonic_ns() >= t->budget_end) {
        t->timed_out = 1;
        return wasmtime_error_new("time budget exhausted");
    }
    *delta = 1;
    *kind = 0; /* WASMTIME_UPDATE_DEADLINE_CONTINUE */
    return NULL;
}

static wasi_config_t *make_wasi(vs_thread *t, const vs_function *fn, size_t env_count,
                                const uint8_t *stdin_data, size_t stdin_len) {
    wasi_config_t *config = wasi_config_new();
    if (env_count && !wasi_config_set_env(config, env_count, t->env_names, t->env_values))
        goto fail;
    if (fn->env_count &&
        !wasi_config_set_env(config, fn->env_count, fn->env_names, fn->env_values))
        goto fail;
    if (!wasi_config_set_argv(config, fn->argc, fn->argv)) goto fail;
    if (stdin_len) {
        wasm_byte_vec_t vec;
        wasm_byte_vec_new(&vec, stdin_len, stdin_data); /* copies */
        wasi_config_set_stdin_bytes(config, &vec);      /* takes ownership */
    }
    return config; /* (stdout and stderr: vs_define_capture) */
fail:
    wasi_config_delete(config);
    return NULL;
}

static int run_in(vs_thread *t, wasmtime_context_t *cx, const wasmtime_instance_pre_t *pre) {
    int64_t *out = t->out;
    wasm_trap_t *trap = NULL;
    wasmtime_error_t *error = wasmtime_instance_pre_instantiate(pre, cx, t->instance, &trap);
    if (error && t->timed_out) { /* (a start function that ran out of time) */
        wasmtime_error_delete(error);
        return VS_TIMEOUT;
    }
    if (error || trap) {
        out[VS_ERROR] = (int64_t)(intptr_t)error;
        out[VS_TRAP] = (int64_t)(intptr_t)trap;
        return VS_INSTANTIATE;
    }
    if (!wasmtime_instance_export_get(cx, t->instance, "memory", 6, t->memory) ||
        !wasmtime_instance_export_get(cx, t->instance, "_start", 6, t->start))
        return VS_EXPORTS;
    error = wasmtime_func_call(cx, t->start + t->extern_of, NULL, 0, NULL, 0, &trap);
    out[VS_MEMORY] = (int64_t)wasmtime_memory_data_size(cx, t->memory + t->extern_of);
    if (error) {
        int code = 0;
        if (wasmtime_error_exit_status(error, &code)) {
            wasmtime_error_delete(error);
            out[VS_EXIT_CODE] = code;
            return VS_RAN;
        }
        if (t->timed_out) {
            wasmtime_error_delete(error);
            return VS_TIMEOUT;
        }
        out[VS_ERROR] = (int64_t)(intptr_t)error;
        return VS_START;
    }
    if (trap) {
        out[VS_TRAP] = (int64_t)(intptr_t)trap;
        return VS_START;
    }
    return VS_RAN;
}

/* What went to stdout and stderr, and where stdout's CGI head ends. */
static void read_outputs(vs_thread *t) {
    int64_t *out = t->out;
    vs_sink *so = &t->out_sink, *se = &t->err_sink;
    out[VS_STDOUT_LEN] = (int64_t)so->total;
    out[VS_STDOUT_AT] = (int64_t)(intptr_t)so->data;
    out[VS_STDERR_SIZE] = (int64_t)se->total;
    out[VS_STDERR_AT] = (int64_t)(intptr_t)se->data;
    out[VS_STDOUT_KEPT] = (int64_t)so->kept;
    out[VS_STDERR_KEPT] = (int64_t)se->kept;
    int64_t sep;
    int64_t end = vs_head_end(so->data, so->kept, t->head_limit, &sep);
    if (end >= 0) {
        out[VS_HEAD_END] = end;
        out[VS_BODY_AT] = end + sep;
    }
}

/* The run in a fresh store, with `env_count` request variables in the thread's arrays. */
static int run_store(vs_thread *t, const vs_function *fn, size_t env_count,
                     const uint8_t *stdin_data, size_t stdin_len) {
    int64_t *out = t->out;
    if (t->ticker) vs_ticker_enter(t->ticker);
    wasmtime_store_t *store = wasmtime_store_new(t->engine, NULL, NULL);
    wasmtime_context_t *cx = t->context = wasmtime_store_context(store);
    sink_reset(&t->out_sink, fn->stdout_keep);
    sink_reset(&t->err_sink, fn->stderr_keep);
    vs_current = t;
    wasmtime_store_limiter(store, fn->memory_bytes, -1, -1, -1, -1);
    wasmtime_context_set_epoch_deadline(cx, 1);
    wasmtime_store_epoch_deadline_callback(store, on_deadline, t, NULL);
    int status = VS_SETUP;
    wasi_config_t *config = make_wasi(t, fn, env_count, stdin_data, stdin_len);
    if (config) {
        wasmtime_error_t *error = wasmtime_context_set_wasi(cx, config); /* takes it */
        if (error)
            out[VS_ERROR] = (int64_t)(intptr_t)error;
        else
            status = run_in(t, cx, fn->pre);
    }
    if (t->ticker) vs_ticker_leave(t->ticker);
    vs_current = NULL;
    t->context = NULL;
    wasmtime_store_delete(store);
    if (config) read_outputs(t);
    return status;
}

/* One invocation of `fn` in a fresh store; results in t->out (see the enums). The run gets
 * `budget_ns` of (wall-clock) time from now, checked at each epoch tick (VS_TIMEOUT). The
 * request's environment is `blob` (see split_env; `blob_len` bytes and a NUL), stdin
 * `stdin_data`. fn's InstancePre must come from a linker vs_define_capture made. Unless
 * VS_SETUP: stdout's first bytes (up to fn->stdout_keep) are at
 * out[VS_STDOUT_AT] (the caller's buffer while they fit), out[VS_HEAD_END] and
 * out[VS_BODY_AT] say where its CGI head ends and its body starts in them (-1: no blank
 * line), out[VS_STDERR_SIZE] how much went to stderr (its first bytes at out[VS_STDERR_AT]).
 * out[VS_CPU_NS] and out[VS_WALL_NS]: the thread's CPU time and the time the call took.
 * Errors and traps returned in out are the caller's. */
int vs_invoke(vs_thread *t, const vs_function *fn, uint64_t budget_ns, const char *blob,
              size_t blob_len, const uint8_t *stdin_data, size_t stdin_len) {
    int64_t *out = t->out;
    uint64_t cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID), wall0 = monotonic_ns();
    memset(out, 0, sizeof t->out);
    out[VS_HEAD_END] = out[VS_BODY_AT] = -1;
    t->timed_out = 0;
    t->budget_end = wall0 + budget_ns;
    ptrdiff_t env_count = split_env(t, fn, blob, blob_len);
    int status = VS_SETUP;
    if (env_count >= 0) status = run_store(t, fn, (size_t)env_count, stdin_data, stdin_len);
    out[VS_STATUS] = status;
    out[VS_WALL_NS] = (int64_t)(monotonic_ns() - wall0);
    out[VS_CPU_NS] = (int64_t)(clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0);
    return status;
}
