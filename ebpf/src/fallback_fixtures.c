// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * fallback-fixtures: TEST OBJECTS, never deployed. The packet classifier (XDP)
 * with one deliberate verifier error, so that the agent's fallback paths can be
 * exercised on any kernel. Same programs, maps and globals as
 * packet-classifier-xdp, so a CR written for it also matches these.
 *
 *   -DFIXTURE_REJECT_ENTRY  fallback-fixtures-reject: `classify` reads packet
 *                           data without a bounds check; the verifier rejects it
 *                           ("invalid access to packet"), so the whole variant
 *                           fails and the agent moves to the next variant.
 *   -DFIXTURE_REJECT_UDP    fallback-fixtures-badhandler: only `handle_udp` does
 *                           that read; classify, handle_tcp and handle_icmp load,
 *                           and UDP must take the default path. Under static
 *                           dispatch, the same read is inlined into classify
 *                           behind bit 17 of bpfpoly_handler_mask: clear the bit
 *                           and classify loads.
 *   -DFIXTURE_REJECT_UDP -DFIXTURE_FREPLACE
 *                           fallback-fixtures-badhandler-freplace: the same
 *                           handlers as freplace programs (the handlerBytecode of
 *                           a freplace variant whose entry is
 *                           packet-classifier-xdp): the extension of slot 17 is
 *                           rejected, so UDP takes the entry's default path.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "bpfpoly.h"

/* Reads the first packet byte without checking data_end: always rejected. */
#define FIXTURE_UNCHECKED_READ(ctx)                                                    \
	do {                                                                           \
		volatile __u8 __fixture_byte = *(volatile __u8 *)(long)(ctx)->data;    \
		(void)__fixture_byte;                                                  \
	} while (0)

#if defined(FIXTURE_REJECT_ENTRY)
#define CLASSIFIER_ENTRY_HOOK(ctx) FIXTURE_UNCHECKED_READ(ctx)
#elif defined(FIXTURE_REJECT_UDP)
#define CLASSIFIER_HANDLER_HOOK(ctx, key)                                              \
	do {                                                                           \
		if ((key) == CLASSIFIER_KEY_UDP)                                       \
			FIXTURE_UNCHECKED_READ(ctx);                                   \
	} while (0)
#else
#error "define FIXTURE_REJECT_ENTRY or FIXTURE_REJECT_UDP"
#endif

#if defined(FIXTURE_FREPLACE)
#define CLASSIFIER_FREPLACE
#else
#define CLASSIFIER_XDP
#endif
#include "packet_classifier.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";
