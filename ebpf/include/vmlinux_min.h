/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * vmlinux_min.h: the few kernel types bpfpoly's tracing programs read, declared
 * by hand instead of a full `bpftool btf dump` of one kernel.
 *
 * Every struct carries __attribute__((preserve_access_index)), so clang emits
 * CO-RE relocations for each field access and the loader (aya, libbpf) rewrites
 * offsets against the BTF of the kernel the program is loaded on. A struct here
 * therefore only lists the fields the programs touch, in any order; names and
 * types must match the kernel's. A field that a kernel may lack (loginuid needs
 * CONFIG_AUDIT) must be guarded with bpf_core_field_exists().
 *
 * xdp_md and __sk_buff are UAPI and come from <linux/bpf.h>, not from here.
 * Defining __VMLINUX_H__ tells <bpf/bpf_tracing.h> that struct pt_regs uses the
 * kernel's register names (di, si, ...), as declared below.
 */
#ifndef BPFPOLY_VMLINUX_MIN_H
#define BPFPOLY_VMLINUX_MIN_H

#ifndef __VMLINUX_H__
#define __VMLINUX_H__
#endif

#include <linux/types.h>

typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;
typedef int pid_t;
typedef unsigned int uid_t;

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

typedef struct {
	uid_t val;
} kuid_t;

struct task_struct {
	pid_t pid;
	pid_t tgid;
	struct task_struct *real_parent;
	char comm[16];
	kuid_t loginuid; /* CONFIG_AUDIT only: check with bpf_core_field_exists() */
};

struct linux_binprm {
	const char *filename;
};

/* x86-64 register layout (kprobe context); only the argument registers. */
struct pt_regs {
	unsigned long r8;
	unsigned long cx;
	unsigned long dx;
	unsigned long si;
	unsigned long di;
	unsigned long ax;
	unsigned long ip;
	unsigned long sp;
};

struct trace_entry {
	unsigned short type;
	unsigned char flags;
	unsigned char preempt_count;
	int pid;
};

/* Context of tracepoint/sched/sched_process_exec (the raw trace record). */
struct trace_event_raw_sched_process_exec {
	struct trace_entry ent;
	u32 __data_loc_filename; /* low 16 bits: offset of the string from the record start */
	pid_t pid;
	pid_t old_pid;
	char __data[0];
};

#pragma clang attribute pop

#endif /* BPFPOLY_VMLINUX_MIN_H */
