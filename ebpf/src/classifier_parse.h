/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * classifier_parse.h: the packet parser shared by every packet-classifier
 * variant (XDP and TC). It reads Ethernet, up to two 802.1Q/802.1ad tags (when
 * vlan_aware), IPv4 or IPv6 (with up to CLASSIFIER_MAX_EXT_HDRS extension
 * headers) and checks that the L4 header of TCP, UDP and ICMP is complete.
 * Every access is bounds-checked against data_end and every loop has a
 * constant bound, so it verifies on any kernel with bounded loops or unrolling.
 *
 * The caller provides `data`, `data_end` and the frame length; the result is a
 * struct classifier_pkt, whose `key` is the dispatch key:
 *   key = the IP protocol number (TCP 6, UDP 17, ICMP 1, ...),
 *   except ICMPv6 (58), which maps to key 1 so one ICMP handler serves both
 *   address families (the raw number stays in l4_proto).
 */
#ifndef CLASSIFIER_PARSE_H
#define CLASSIFIER_PARSE_H

#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <bpf/bpf_endian.h>

#define CLASSIFIER_KEY_ICMP 1
#define CLASSIFIER_KEY_TCP 6
#define CLASSIFIER_KEY_UDP 17

#define CLASSIFIER_MAX_VLAN_TAGS 2
#define CLASSIFIER_MAX_EXT_HDRS 4

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif
#define CLASSIFIER_NEXTHDR_HOP 0
#define CLASSIFIER_NEXTHDR_ROUTING 43
#define CLASSIFIER_NEXTHDR_FRAGMENT 44
#define CLASSIFIER_NEXTHDR_AUTH 51
#define CLASSIFIER_NEXTHDR_DEST 60

/* Parsed packet, handed to handlers through the per-CPU map classifier_scratch. */
struct classifier_pkt {
	__u32 key;      /* dispatch key, 0..255 */
	__u32 len;      /* frame length in bytes (XDP: data_end - data; TC: skb->len) */
	__u16 l3_proto; /* ETH_P_IP or ETH_P_IPV6, host order */
	__u16 vlan_id;  /* VID of the outermost tag, 0 when untagged */
	__u8 l4_proto;  /* raw IP protocol / IPv6 next header (58 for ICMPv6) */
	__u8 vlan_tags; /* number of VLAN tags parsed */
	__u16 l4_off;   /* offset of the L4 header from the frame start */
};

struct classifier_vlan_hdr {
	__be16 tci;
	__be16 encapsulated_proto;
};

/* Minimum L4 header length for the protocols that have handlers; 0 = no check. */
static __always_inline __u32 classifier_l4_min_len(__u8 proto)
{
	switch (proto) {
	case IPPROTO_TCP:
		return 20;
	case IPPROTO_UDP:
		return 8;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		return 4;
	default:
		return 0;
	}
}

/*
 * Parses the frame at [data, data_end). Returns 0 and fills *pkt when the frame
 * is IPv4 or IPv6 with a complete L3 header (and a complete L4 header for TCP,
 * UDP and ICMP); returns -1 otherwise (not IP, truncated, malformed): the
 * caller then takes the default path.
 */
static __always_inline int classifier_parse(void *data, void *data_end, __u32 frame_len,
					    bool vlan_aware, struct classifier_pkt *pkt)
{
	struct ethhdr *eth = data;
	__u16 proto;
	void *cursor;
	__u32 off = sizeof(*eth); /* == cursor - data, kept as a scalar */
	__u8 l4;

	if ((void *)(eth + 1) > data_end)
		return -1;
	proto = bpf_ntohs(eth->h_proto);
	cursor = eth + 1;
	pkt->vlan_id = 0;
	pkt->vlan_tags = 0;

	if (vlan_aware) {
#pragma unroll
		for (int i = 0; i < CLASSIFIER_MAX_VLAN_TAGS; i++) {
			struct classifier_vlan_hdr *vh = cursor;

			if (proto != ETH_P_8021Q && proto != ETH_P_8021AD)
				break;
			if ((void *)(vh + 1) > data_end)
				return -1;
			if (pkt->vlan_tags == 0)
				pkt->vlan_id = bpf_ntohs(vh->tci) & 0x0fff;
			pkt->vlan_tags++;
			proto = bpf_ntohs(vh->encapsulated_proto);
			cursor = vh + 1;
			off += sizeof(*vh);
		}
	}

	if (proto == ETH_P_IP) {
		struct iphdr *iph = cursor;
		__u32 ihl_len;

		if ((void *)(iph + 1) > data_end)
			return -1;
		if (iph->version != 4 || iph->ihl < 5)
			return -1;
		ihl_len = iph->ihl * 4;
		if (cursor + ihl_len > data_end)
			return -1;
		l4 = iph->protocol;
		cursor += ihl_len;
		off += ihl_len;
	} else if (proto == ETH_P_IPV6) {
		struct ipv6hdr *ip6 = cursor;

		if ((void *)(ip6 + 1) > data_end)
			return -1;
		if (ip6->version != 6)
			return -1;
		l4 = ip6->nexthdr;
		cursor = ip6 + 1;
		off += sizeof(*ip6);
#pragma unroll
		for (int i = 0; i < CLASSIFIER_MAX_EXT_HDRS; i++) {
			__u8 *ext = cursor;
			__u32 ext_len;

			if (l4 != CLASSIFIER_NEXTHDR_HOP && l4 != CLASSIFIER_NEXTHDR_ROUTING &&
			    l4 != CLASSIFIER_NEXTHDR_FRAGMENT && l4 != CLASSIFIER_NEXTHDR_AUTH &&
			    l4 != CLASSIFIER_NEXTHDR_DEST)
				break;
			/* next header (1 byte) and length (1 byte) */
			if ((void *)(ext + 2) > data_end)
				return -1;
			if (l4 == CLASSIFIER_NEXTHDR_FRAGMENT)
				ext_len = 8;
			else if (l4 == CLASSIFIER_NEXTHDR_AUTH)
				ext_len = ((__u32)ext[1] + 2) * 4;
			else
				ext_len = ((__u32)ext[1] + 1) * 8;
			l4 = ext[0];
			cursor += ext_len;
			off += ext_len;
		}
	} else {
		return -1;
	}

	if (cursor + classifier_l4_min_len(l4) > data_end)
		return -1;

	pkt->l3_proto = proto;
	pkt->l4_proto = l4;
	pkt->l4_off = (__u16)off;
	pkt->key = l4 == IPPROTO_ICMPV6 ? CLASSIFIER_KEY_ICMP : l4;
	pkt->len = frame_len;
	return 0;
}

#endif /* CLASSIFIER_PARSE_H */
