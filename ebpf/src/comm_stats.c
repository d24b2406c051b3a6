// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * comm-stats: a histogram of the length of the command name (comm) of every
 * process that execs, in the ARRAY map `comm_len` (index = length, 0..16).
 *
 * It exists to show a fallback that only the verifier can decide: the first
 * variant scans the name with the bpf_loop() helper (Linux 5.17+), the second
 * with a bounded loop (5.3+). The sample (crds/examples/comm-stats.yaml)
 * declares no requirement that would rule bpf_loop out in advance, so the
 * operator offers it everywhere; a 5.10 verifier refuses the unknown helper
 * ("invalid func unknown#181") and the agent loads the next variant.
 *   COMM_STATS_LOOP      the scan is a bpf_loop() callback
 *   COMM_STATS_BOUNDED   the scan is a bounded for loop
 * Both attach to the raw tracepoint sched_process_exec as `on_exec` (a raw
 * tracepoint's attachment is a bpf_link from 5.8 on, so the agent can pin it on
 * every kernel of the matrix; perf-event links, for tracepoints and kprobes,
 * need 5.15).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "bpfpoly.h"

#if defined(COMM_STATS_LOOP) + defined(COMM_STATS_BOUNDED) != 1
#error "define exactly one of COMM_STATS_LOOP, COMM_STATS_BOUNDED"
#endif

#define COMM_LEN 16

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, COMM_LEN + 1);
	__type(key, __u32);
	__type(value, __u64);
} comm_len SEC(".maps");

struct scan {
	char comm[COMM_LEN];
	__u32 len;
};

#if defined(COMM_STATS_LOOP)
static long scan_one(__u32 index, void *data)
{
	struct scan *s = data;

	if (index >= COMM_LEN || s->comm[index] == 0)
		return 1; /* stop */
	s->len = index + 1;
	return 0;
}
#endif

SEC("raw_tracepoint/sched_process_exec")
int on_exec(struct bpf_raw_tracepoint_args *ctx)
{
	struct scan s = {};
	__u32 key;
	__u64 *count;

	bpf_get_current_comm(s.comm, sizeof(s.comm));
#if defined(COMM_STATS_LOOP)
	bpf_loop(COMM_LEN, scan_one, &s, 0);
#else
	for (__u32 i = 0; i < COMM_LEN; i++) {
		if (s.comm[i] == 0)
			break;
		s.len = i + 1;
	}
#endif
	key = s.len;
	if (key > COMM_LEN)
		key = COMM_LEN;
	count = bpf_map_lookup_elem(&comm_len, &key);
	if (count)
		__sync_fetch_and_add(count, 1);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
