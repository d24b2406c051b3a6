// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * exec-tracer: reports every successful execve() to user space as a
 * BPFPOLY_EVENT_EXEC record (bpfpoly.h): pid, ppid, comm (after exec),
 * filename, and the audit loginuid where the kernel has it.
 *
 * One source, three attach points, chosen with one -D flag (see the Makefile).
 * The program is called `on_exec` in every variant.
 *   EXEC_TRACER_TPBTF       SEC("tp_btf/sched_process_exec")      needs BTF, 5.5+
 *   EXEC_TRACER_TRACEPOINT  SEC("tracepoint/sched/sched_process_exec")  any kernel
 *                           with tracepoints; filename from the trace record
 *   EXEC_TRACER_KPROBE      SEC("kprobe/finalize_exec")           needs
 *                           CONFIG_KPROBES; finalize_exec() runs after the new
 *                           comm is set, like the tracepoint
 *
 * Config (.rodata):
 *   use_ringbuf    bool, default true: send through the BPF_MAP_TYPE_RINGBUF
 *                  `events` (5.8+); false: the perf event array `events_perf`.
 *   read_loginuid  bool, default true: fill loginuid. The read is also guarded
 *                  by bpf_core_field_exists(task->loginuid) (CONFIG_AUDIT), so
 *                  the field's `requires` is about the kernel, the flag about
 *                  the user's wish; the agent writes the fallback false where
 *                  the field is missing and the verifier prunes the read.
 */
#include "vmlinux_min.h"
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "bpfpoly.h"

#if defined(EXEC_TRACER_TPBTF) + defined(EXEC_TRACER_TRACEPOINT) + defined(EXEC_TRACER_KPROBE) != 1
#error "define exactly one of EXEC_TRACER_TPBTF, EXEC_TRACER_TRACEPOINT, EXEC_TRACER_KPROBE"
#endif

BPFPOLY_CONFIG(bool, use_ringbuf, true);
BPFPOLY_CONFIG(bool, read_loginuid, true);

/* Exec records, when use_ringbuf. 256 KiB, shared by all CPUs. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* Exec records, when !use_ringbuf. One perf buffer per CPU (size set by the loader). */
struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} events_perf SEC(".maps");

/* Builds the record for the current task and sends it; filename is a kernel pointer. */
static __always_inline int exec_report(void *ctx, const void *filename)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct bpfpoly_event ev;

	__builtin_memset(&ev, 0, sizeof(ev));
	ev.hdr.kind = BPFPOLY_EVENT_EXEC;
	ev.hdr.len = sizeof(ev);
	ev.exec.pid = bpf_get_current_pid_tgid() >> 32;
	ev.exec.ppid = BPF_CORE_READ(task, real_parent, tgid);
	ev.exec.loginuid = (__u32)-1;
	if (read_loginuid && bpf_core_field_exists(task->loginuid)) {
		ev.exec.loginuid = BPF_CORE_READ(task, loginuid.val);
		ev.exec.flags |= BPFPOLY_EXEC_HAS_LOGINUID;
	}
	bpf_get_current_comm(ev.exec.comm, sizeof(ev.exec.comm));
	bpf_probe_read_kernel_str(ev.exec.filename, sizeof(ev.exec.filename), filename);

	if (use_ringbuf)
		bpf_ringbuf_output(&events, &ev, sizeof(ev), 0);
	else
		bpf_perf_event_output(ctx, &events_perf, BPF_F_CURRENT_CPU, &ev, sizeof(ev));
	return 0;
}

#if defined(EXEC_TRACER_TPBTF)

SEC("tp_btf/sched_process_exec")
int BPF_PROG(on_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	return exec_report(ctx, BPF_CORE_READ(bprm, filename));
}

#elif defined(EXEC_TRACER_TRACEPOINT)

SEC("tracepoint/sched/sched_process_exec")
int on_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	/* __data_loc: low 16 bits are the string's offset inside the record. */
	__u32 filename_off = ctx->__data_loc_filename & 0xffff;

	return exec_report(ctx, (void *)ctx + filename_off);
}

#elif defined(EXEC_TRACER_KPROBE)

SEC("kprobe/finalize_exec")
int BPF_KPROBE(on_exec, struct linux_binprm *bprm)
{
	return exec_report(ctx, BPF_CORE_READ(bprm, filename));
}

#endif

char LICENSE[] SEC("license") = "GPL";
