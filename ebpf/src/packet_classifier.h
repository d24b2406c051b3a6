/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * packet_classifier.h: the packet classifier, one source for all its objects.
 *
 * The entry program `classify` parses a frame (classifier_parse.h), stores the
 * result in the per-CPU map classifier_scratch and dispatches on the L4 key to
 *   handle_icmp (key 1; ICMP and ICMPv6), handle_tcp (6), handle_udp (17).
 * Handlers count packets and bytes per key in classifier_stats. Frames that do
 * not parse, keys without a handler and empty slots take the default path:
 * counted in bpfpoly_dispatch[BPFPOLY_DEFAULT_SLOT], verdict PASS.
 *
 * Select the variant with exactly one -D flag:
 *   CLASSIFIER_XDP       SEC("xdp") entry + handlers + freplace slots
 *   CLASSIFIER_TC        SEC("classifier") entry + handlers + slots (__sk_buff)
 *   CLASSIFIER_FREPLACE  only the handlers, as SEC("freplace/bpfpoly_slot_<key>")
 *                        programs for the slots of the XDP entry
 *
 * Test fixtures may define CLASSIFIER_ENTRY_HOOK(ctx) and
 * CLASSIFIER_HANDLER_HOOK(ctx, key) (statements run first in the entry and in
 * each handler body) to plant a verifier error; see fallback_fixtures.c.
 */
#ifndef PACKET_CLASSIFIER_H
#define PACKET_CLASSIFIER_H

#include "classifier_parse.h"

#if defined(CLASSIFIER_TC) + defined(CLASSIFIER_XDP) + defined(CLASSIFIER_FREPLACE) != 1
#error "define exactly one of CLASSIFIER_XDP, CLASSIFIER_TC, CLASSIFIER_FREPLACE"
#endif

#if defined(CLASSIFIER_TC)
#define CLASSIFIER_CTX struct __sk_buff
#define CLASSIFIER_PROG_SEC "classifier"
#define CLASSIFIER_PASS TC_ACT_OK
/* skb->len counts non-linear data the program cannot read, as the wire does. */
#define CLASSIFIER_FRAME_LEN(ctx, data, data_end) ((ctx)->len)
#else
#define CLASSIFIER_CTX struct xdp_md
#define CLASSIFIER_PROG_SEC "xdp"
#define CLASSIFIER_PASS XDP_PASS
#define CLASSIFIER_FRAME_LEN(ctx, data, data_end) ((__u32)((data_end) - (data)))
#endif

#ifndef CLASSIFIER_ENTRY_HOOK
#define CLASSIFIER_ENTRY_HOOK(ctx) do { } while (0)
#endif
#ifndef CLASSIFIER_HANDLER_HOOK
#define CLASSIFIER_HANDLER_HOOK(ctx, key) do { } while (0)
#endif

#define CLASSIFIER_STR_(x) #x
#define CLASSIFIER_STR(x) CLASSIFIER_STR_(x)
#define CLASSIFIER_CAT_(a, b) a##b
#define CLASSIFIER_CAT(a, b) CLASSIFIER_CAT_(a, b)

/* ---- config ------------------------------------------------------------- */

/* Count bytes as well as packets. false leaves classifier_stats[*].bytes at 0. */
BPFPOLY_CONFIG(bool, count_bytes, true);
/* Parse up to two 802.1Q / 802.1ad tags; false sends tagged frames to the default path. */
BPFPOLY_CONFIG(bool, vlan_aware, false);

/* ---- maps --------------------------------------------------------------- */

struct classifier_counters {
	__u64 packets;
	__u64 bytes;
};

/* Per key (0..255): packets and bytes the handler of that key saw. Per-CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct classifier_counters);
	__uint(max_entries, BPFPOLY_MAX_KEYS);
} classifier_stats SEC(".maps");

/*
 * The parsed packet, from the entry to the handler it dispatches to. Per-CPU
 * and single-slot: entry and handler run on one CPU without preemption in
 * between (a tail call, a direct call or a trampoline jump).
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct classifier_pkt);
	__uint(max_entries, 1);
} classifier_scratch SEC(".maps");

static __always_inline struct classifier_pkt *classifier_scratch_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&classifier_scratch, &zero);
}

/* ---- handlers ----------------------------------------------------------- */

/* What every handler does: count the packet (and its bytes) under its key. */
static __always_inline int classifier_account(struct classifier_pkt *pkt)
{
	__u32 key = pkt->key;
	struct classifier_counters *c = bpf_map_lookup_elem(&classifier_stats, &key);

	if (c) {
		c->packets += 1;
		if (count_bytes)
			c->bytes += pkt->len;
	}
	return CLASSIFIER_PASS;
}

/*
 * CLASSIFIER_HANDLER(name, key) defines
 *  - name##_body(ctx, pkt): the handler logic, inlined by static dispatch;
 *  - the program `name`: SEC("xdp"/"classifier") for tail calls, or
 *    SEC("freplace/bpfpoly_slot_<key>") in the freplace object. Both read the
 *    parsed packet from classifier_scratch.
 */
#if defined(CLASSIFIER_FREPLACE)
#define CLASSIFIER_HANDLER_SEC(key) "freplace/bpfpoly_slot_" CLASSIFIER_STR(key)
#else
#define CLASSIFIER_HANDLER_SEC(key) CLASSIFIER_PROG_SEC
#endif

#define CLASSIFIER_HANDLER(name, key)                                                  \
	static __always_inline int name##_body(CLASSIFIER_CTX *ctx, struct classifier_pkt *pkt) \
	{                                                                              \
		CLASSIFIER_HANDLER_HOOK(ctx, key);                                     \
		return classifier_account(pkt);                                        \
	}                                                                              \
	SEC(CLASSIFIER_HANDLER_SEC(key))                                               \
	int name(CLASSIFIER_CTX *ctx)                                                  \
	{                                                                              \
		struct classifier_pkt *pkt = classifier_scratch_get();                 \
		if (!pkt)                                                              \
			return CLASSIFIER_PASS;                                        \
		return name##_body(ctx, pkt);                                          \
	}

CLASSIFIER_HANDLER(handle_icmp, 1)
CLASSIFIER_HANDLER(handle_tcp, 6)
CLASSIFIER_HANDLER(handle_udp, 17)

/* ---- entry -------------------------------------------------------------- */

#if !defined(CLASSIFIER_FREPLACE)

BPFPOLY_DEFINE_DISPATCH((1ULL << CLASSIFIER_KEY_ICMP) | (1ULL << CLASSIFIER_KEY_TCP) |
			(1ULL << CLASSIFIER_KEY_UDP));

BPFPOLY_DEFINE_SLOT(1, CLASSIFIER_CTX)
BPFPOLY_DEFINE_SLOT(6, CLASSIFIER_CTX)
BPFPOLY_DEFINE_SLOT(17, CLASSIFIER_CTX)

SEC(CLASSIFIER_PROG_SEC)
int classify(CLASSIFIER_CTX *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct classifier_pkt *pkt;
	int rc = BPFPOLY_NOT_HANDLED;

	CLASSIFIER_ENTRY_HOOK(ctx);

	pkt = classifier_scratch_get();
	if (!pkt || classifier_parse(data, data_end, CLASSIFIER_FRAME_LEN(ctx, data, data_end),
				     vlan_aware, pkt) < 0)
		goto default_path;

	if (bpfpoly_dispatch_mode == BPFPOLY_MECH_STATIC) {
		switch (pkt->key) {
		case CLASSIFIER_KEY_ICMP:
			if (BPFPOLY_STATIC_ENABLED(CLASSIFIER_KEY_ICMP))
				rc = handle_icmp_body(ctx, pkt);
			break;
		case CLASSIFIER_KEY_TCP:
			if (BPFPOLY_STATIC_ENABLED(CLASSIFIER_KEY_TCP))
				rc = handle_tcp_body(ctx, pkt);
			break;
		case CLASSIFIER_KEY_UDP:
			if (BPFPOLY_STATIC_ENABLED(CLASSIFIER_KEY_UDP))
				rc = handle_udp_body(ctx, pkt);
			break;
		}
	} else if (bpfpoly_dispatch_mode == BPFPOLY_MECH_FREPLACE) {
		switch (pkt->key) {
		case CLASSIFIER_KEY_ICMP:
			rc = bpfpoly_slot_1(ctx);
			break;
		case CLASSIFIER_KEY_TCP:
			rc = bpfpoly_slot_6(ctx);
			break;
		case CLASSIFIER_KEY_UDP:
			rc = bpfpoly_slot_17(ctx);
			break;
		}
	} else {
		/*
		 * Returns only when jump_table[key] is empty; counts the default slot.
		 * The keys compiled in jump directly (constant keys); any other key a
		 * dispatch table names goes through the indirect tail call.
		 */
		switch (pkt->key) {
		case CLASSIFIER_KEY_ICMP:
			BPFPOLY_TAIL_DISPATCH_CONST(ctx, CLASSIFIER_KEY_ICMP);
			break;
		case CLASSIFIER_KEY_TCP:
			BPFPOLY_TAIL_DISPATCH_CONST(ctx, CLASSIFIER_KEY_TCP);
			break;
		case CLASSIFIER_KEY_UDP:
			BPFPOLY_TAIL_DISPATCH_CONST(ctx, CLASSIFIER_KEY_UDP);
			break;
		default:
			BPFPOLY_TAIL_DISPATCH(ctx, pkt->key);
			break;
		}
		return CLASSIFIER_PASS;
	}

	if (rc != BPFPOLY_NOT_HANDLED) {
		BPFPOLY_COUNT(pkt->key, 1);
		return rc;
	}
default_path:
	BPFPOLY_COUNT(BPFPOLY_DEFAULT_SLOT, 1);
	return CLASSIFIER_PASS;
}

#endif /* !CLASSIFIER_FREPLACE */

#endif /* PACKET_CLASSIFIER_H */
