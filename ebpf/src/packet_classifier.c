// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * packet-classifier: counts traffic per L4 protocol through a polymorphic
 * dispatcher. Built three times (see the Makefile):
 *   packet-classifier-xdp       -DCLASSIFIER_XDP
 *   packet-classifier-tc        -DCLASSIFIER_TC
 *   packet-classifier-freplace  -DCLASSIFIER_FREPLACE
 * The logic lives in packet_classifier.h and classifier_parse.h.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "bpfpoly.h"
#include "packet_classifier.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";
