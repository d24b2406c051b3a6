/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * bpfpoly.h: the contract between a polymorphic eBPF program and the bpfpoly
 * node agent. The agent finds everything below by name in the object's BTF and
 * ELF symbols, so the names, map types and value layouts are ABI: change them
 * only together with the agent.
 *
 * Include <linux/bpf.h> (or vmlinux_min.h plus <linux/bpf.h>) and
 * <bpf/bpf_helpers.h> first.
 *
 * Contents
 *  1. Config globals: `volatile const` scalars in .rodata (BPFPOLY_CONFIG).
 *  2. Dispatch: keys, the counter map `bpfpoly_dispatch`, the PROG_ARRAY
 *     `jump_table`, the mechanism switch and the static enable mask
 *     (BPFPOLY_DEFINE_DISPATCH), the tail-call dispatch (BPFPOLY_TAIL_DISPATCH)
 *     and the freplace slot functions (BPFPOLY_DEFINE_SLOT).
 *  3. Events: a tagged union that every ring-buffer / perf record starts with.
 */
#ifndef BPFPOLY_H
#define BPFPOLY_H

/* ------------------------------------------------------------------------- */
/* 1. Config globals ("struct tags")                                          */
/* ------------------------------------------------------------------------- */
/*
 * A config field is a `volatile const` global in .rodata. The agent writes the
 * resolved value (the CR's `value`, or its `fallback` where a requirement does
 * not hold) into .rodata before load; the kernel freezes the map, so the
 * verifier knows the value and prunes the branch that is switched off.
 * `volatile` keeps clang from folding the default into the code.
 *
 * Declare with BPFPOLY_CONFIG(type, name, default). The agent checks the BTF
 * type of the variable against the CR's declared type; use exactly these type
 * spellings, whose BTF names and sizes map one to one:
 *
 *   CR type   C type    BTF (after typedefs)       size
 *   bool      bool      INT "_Bool", BOOL encoding  1
 *   u8        __u8      INT "unsigned char"         1
 *   u16       __u16     INT "unsigned short"        2
 *   u32       __u32     INT "unsigned int"          4
 *   u64       __u64     INT "unsigned long long"    8
 *   i32       __s32     INT "int", SIGNED           4
 *   i64       __s64     INT "long long", SIGNED     8
 *
 * bool is C's _Bool (from <stdbool.h> semantics, spelled `bool` via the
 * typedef below), never __u8: the agent tells bool from u8 by the BTF INT
 * encoding, and writes 0 or 1.
 */
#ifndef __cplusplus
#ifndef bool
typedef _Bool bool;
#define true 1
#define false 0
#endif
#endif

#define BPFPOLY_CONFIG(type, name, dflt) volatile const type name = (dflt)

/* ------------------------------------------------------------------------- */
/* 2. Dispatch                                                                */
/* ------------------------------------------------------------------------- */
/*
 * An entry program computes an integer key (a type tag, 0..255) and hands the
 * event to the handler registered for that key. Handlers are separate programs
 * (tail calls, freplace) or inlined code (static dispatch). An empty slot, an
 * unknown key or a key the entry cannot compute takes the entry's default path.
 */
#define BPFPOLY_MAX_KEYS 256
/* Slot of bpfpoly_dispatch counting events that took the default path. */
#define BPFPOLY_DEFAULT_SLOT 256
#define BPFPOLY_DISPATCH_SLOTS (BPFPOLY_MAX_KEYS + 1)

/*
 * Value of the .rodata global `bpfpoly_dispatch_mode` (a __u32): the mechanism
 * the agent chose for this load. The entry program branches on it; the
 * verifier prunes the other two mechanisms.
 *   TAILCALL (0, default): bpf_tail_call() through `jump_table`, key = index.
 *   STATIC   (1): direct (inlined) calls to the handlers compiled into the
 *                 object, each gated by bit `key` of `bpfpoly_handler_mask`.
 *   FREPLACE (2): call the global function `bpfpoly_slot_<key>`, which a
 *                 freplace (BPF_PROG_TYPE_EXT) program replaces.
 */
#define BPFPOLY_MECH_TAILCALL 0
#define BPFPOLY_MECH_STATIC 1
#define BPFPOLY_MECH_FREPLACE 2

/*
 * What a slot function returns while nobody has replaced it. Handlers never
 * return it (it is not a valid XDP or TC verdict), so the entry can tell
 * "handled" from "empty slot" after the call.
 */
#define BPFPOLY_NOT_HANDLED (-1)

/*
 * Static dispatch mask: bit k enables the inlined handler for key k. Only keys
 * 0..63 can be dispatched statically; handlers for keys >= 64 need tail calls
 * or freplace. The agent clears the bit of a handler the verifier rejected and
 * reloads; the whole handler body is then dead code the verifier never walks.
 */
#define BPFPOLY_STATIC_MAX_KEY 63
#define BPFPOLY_STATIC_ENABLED(key)                                                    \
	((key) <= BPFPOLY_STATIC_MAX_KEY && (bpfpoly_handler_mask & (1ULL << (key))))

/*
 * BPFPOLY_DEFINE_DISPATCH(default_mask) defines, once per object:
 *
 *  bpfpoly_dispatch      PERCPU_ARRAY, key __u32, value __u64, 257 entries.
 *                        Slot k (0..255): events delivered to the handler of
 *                        key k. Slot 256 (BPFPOLY_DEFAULT_SLOT): events that took
 *                        the default path (empty slot, unknown or unparseable).
 *                        Sum over CPUs to read it.
 *  jump_table            PROG_ARRAY, key __u32, value __u32 (a program fd),
 *                        256 entries, indexed by key. Filled by the agent.
 *  bpfpoly_dispatch_mode volatile const __u32, BPFPOLY_MECH_*, default TAILCALL.
 *  bpfpoly_handler_mask  volatile const __u64, static-dispatch enable bits,
 *                        default `default_mask` (the handlers compiled in).
 */
#define BPFPOLY_DEFINE_DISPATCH(default_mask)                                          \
	struct {                                                                       \
		__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);                               \
		__type(key, __u32);                                                    \
		__type(value, __u64);                                                  \
		__uint(max_entries, BPFPOLY_DISPATCH_SLOTS);                           \
	} bpfpoly_dispatch SEC(".maps");                                               \
	struct {                                                                       \
		__uint(type, BPF_MAP_TYPE_PROG_ARRAY);                                 \
		__uint(key_size, sizeof(__u32));                                       \
		__uint(value_size, sizeof(__u32));                                     \
		__uint(max_entries, BPFPOLY_MAX_KEYS);                                 \
	} jump_table SEC(".maps");                                                     \
	BPFPOLY_CONFIG(__u32, bpfpoly_dispatch_mode, BPFPOLY_MECH_TAILCALL);           \
	BPFPOLY_CONFIG(__u64, bpfpoly_handler_mask, (default_mask))

/* Adds n to slot `slot` of bpfpoly_dispatch (per-CPU, so no atomics). */
#define BPFPOLY_COUNT(slot, n)                                                         \
	do {                                                                           \
		__u32 __bpfpoly_slot = (slot);                                         \
		__u64 *__bpfpoly_c = bpf_map_lookup_elem(&bpfpoly_dispatch, &__bpfpoly_slot); \
		if (__bpfpoly_c)                                                       \
			*__bpfpoly_c += (n);                                           \
	} while (0)

/*
 * BPFPOLY_TAIL_DISPATCH(ctx, key): tail-call jump_table[key].
 *
 * The key's counter is raised before the jump, because a successful tail call
 * never returns. If the slot is empty (no handler loaded, or the agent left it
 * empty after a verifier rejection) bpf_tail_call() falls through: the macro
 * takes the count back, counts the default slot, and the caller continues with
 * its default path. Keys >= 256 go straight to the default slot.
 *
 * The key here is a run-time value, so the JIT emits an indirect jump, which
 * goes through a retpoline where Spectre v2 mitigations are on (about 13 ns a
 * packet on this project's benchmark machine). Keys known when the object is
 * built should use BPFPOLY_TAIL_DISPATCH_CONST.
 */
#define BPFPOLY_TAIL_DISPATCH(ctx, key)                                                \
	do {                                                                           \
		__u32 __bpfpoly_key = (key);                                           \
		if (__bpfpoly_key < BPFPOLY_MAX_KEYS)                                  \
			BPFPOLY_TAIL_JUMP_(__bpfpoly_key,                              \
					   bpf_tail_call((ctx), &jump_table, __bpfpoly_key)); \
		BPFPOLY_COUNT(BPFPOLY_DEFAULT_SLOT, 1);                                \
	} while (0)

/*
 * BPFPOLY_TAIL_DISPATCH_CONST(ctx, key): the same for a key that is a constant
 * expression (a `case` of a switch on the key). bpf_tail_call_static() keeps
 * the constant in r3 at its own call site, so the verifier sees one constant
 * key there and the JIT emits a direct jump, patched whenever the agent
 * changes jump_table[key]: no indirect jump, no retpoline.
 */
#define BPFPOLY_TAIL_DISPATCH_CONST(ctx, key)                                          \
	do {                                                                           \
		_Static_assert((key) < BPFPOLY_MAX_KEYS, "tail-call keys are 0..255"); \
		BPFPOLY_TAIL_JUMP_((key), bpf_tail_call_static((ctx), &jump_table, (key))); \
		BPFPOLY_COUNT(BPFPOLY_DEFAULT_SLOT, 1);                                \
	} while (0)

/* Counts `key`, runs `jump`; if that returns (an empty slot), takes the count back. */
#define BPFPOLY_TAIL_JUMP_(key, jump)                                                  \
	do {                                                                           \
		__u32 __bpfpoly_k = (key);                                             \
		__u64 *__bpfpoly_c = bpf_map_lookup_elem(&bpfpoly_dispatch, &__bpfpoly_k); \
		if (__bpfpoly_c)                                                       \
			*__bpfpoly_c += 1;                                             \
		jump;                                                                  \
		if (__bpfpoly_c)                                                       \
			*__bpfpoly_c -= 1;                                             \
	} while (0)

/*
 * BPFPOLY_DEFINE_SLOT(key, ctx_type): the freplace slot for `key`, a global
 * (non-static, __noinline) function `int bpfpoly_slot_<key>(ctx_type *ctx)`
 * that returns BPFPOLY_NOT_HANDLED. A freplace program built with
 * SEC("freplace/bpfpoly_slot_<key>") and the same signature replaces it at
 * attach time; the entry calls it when bpfpoly_dispatch_mode == FREPLACE.
 * The empty asm keeps clang from assuming the return value at call sites.
 */
#define BPFPOLY_DEFINE_SLOT(key, ctx_type)                                             \
	__attribute__((noinline)) int bpfpoly_slot_##key(ctx_type *ctx)                \
	{                                                                              \
		int __bpfpoly_ret = BPFPOLY_NOT_HANDLED;                               \
		asm volatile("" : "+r"(__bpfpoly_ret) : "r"(ctx));                     \
		return __bpfpoly_ret;                                                  \
	}

/* ------------------------------------------------------------------------- */
/* 3. Events                                                                  */
/* ------------------------------------------------------------------------- */
/*
 * Every record a bpfpoly program sends to user space (BPF_MAP_TYPE_RINGBUF or
 * BPF_MAP_TYPE_PERF_EVENT_ARRAY) starts with this header, in host byte order:
 *   kind  which body follows (enum bpfpoly_event_kind); readers skip kinds
 *         they do not know, using len.
 *   len   size of the whole record in bytes, header included.
 * Bodies only grow at the end; a reader accepts len >= the size it knows.
 */
struct bpfpoly_event_hdr {
	__u32 kind;
	__u32 len;
};

enum bpfpoly_event_kind {
	BPFPOLY_EVENT_EXEC = 1,
};

#define BPFPOLY_COMM_LEN 16
#define BPFPOLY_PATH_LEN 256

/* bpfpoly_exec.flags */
#define BPFPOLY_EXEC_HAS_LOGINUID (1U << 0)

/*
 * Body of BPFPOLY_EVENT_EXEC (exec-tracer): a process called execve().
 * Offsets (bytes, from the record start): pid 8, ppid 12, loginuid 16,
 * flags 20, comm 24 (16 bytes, NUL-terminated), filename 40 (256 bytes,
 * NUL-terminated, truncated). Total record size 296.
 */
struct bpfpoly_exec {
	__u32 pid;      /* thread-group id of the process after exec */
	__u32 ppid;     /* thread-group id of its real parent */
	__u32 loginuid; /* audit login uid; (u32)-1 unless HAS_LOGINUID is set */
	__u32 flags;    /* BPFPOLY_EXEC_* */
	char comm[BPFPOLY_COMM_LEN];
	char filename[BPFPOLY_PATH_LEN];
};

/* The tagged union: hdr.kind says which member is valid. */
struct bpfpoly_event {
	struct bpfpoly_event_hdr hdr;
	union {
		struct bpfpoly_exec exec;
	};
};

#endif /* BPFPOLY_H */
