//! The packet classifier under BPF_PROG_TEST_RUN, for node-agent/tests/classifier_dispatch.rs
//! (included with `#[path]`): crafted frames, the dispatch matrix, a loaded classifier with
//! its handlers, and what a run must leave in its maps.
#![allow(dead_code)]

use std::collections::BTreeMap;

use aya::{
    maps::{MapData, PerCpuArray, ProgramArray},
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, Xdp},
    Ebpf, EbpfLoader,
};

use crate::ebpf_support::*;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_GRE: u8 = 47;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const DEFAULT_SLOT: u32 = 256;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;

/// Frame builders (all fields big-endian on the wire).
pub mod frames {
    pub const ETH_P_IP: u16 = 0x0800;
    pub const ETH_P_IPV6: u16 = 0x86dd;
    pub const ETH_P_ARP: u16 = 0x0806;
    pub const ETH_P_8021Q: u16 = 0x8100;
    pub const ETH_P_8021AD: u16 = 0x88a8;

    pub fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    /// Ethernet with VLAN tags (outermost first); the last tag carries `inner`.
    pub fn eth_vlan(tags: &[(u16, u16)], inner: u16) -> Vec<u8> {
        let mut f = eth(tags[0].0);
        for (i, &(_, vid)) in tags.iter().enumerate() {
            f.extend_from_slice(&vid.to_be_bytes());
            let next = tags.get(i + 1).map_or(inner, |t| t.0);
            f.extend_from_slice(&next.to_be_bytes());
        }
        f
    }

    /// A minimal L4 header plus a few payload bytes.
    pub fn l4(proto: u8) -> Vec<u8> {
        let mut h = match proto {
            super::IPPROTO_TCP => {
                let mut h = vec![0u8; 20];
                h[0..2].copy_from_slice(&40000u16.to_be_bytes());
                h[2..4].copy_from_slice(&443u16.to_be_bytes());
                h[12] = 5 << 4; // data offset
                h[13] = 0x02; // SYN
                h
            }
            super::IPPROTO_UDP => {
                let mut h = vec![0u8; 8];
                h[0..2].copy_from_slice(&5353u16.to_be_bytes());
                h[2..4].copy_from_slice(&53u16.to_be_bytes());
                h
            }
            super::IPPROTO_ICMP | super::IPPROTO_ICMPV6 => vec![8, 0, 0, 0, 0, 1, 0, 1],
            _ => vec![0u8; 4],
        };
        h.extend_from_slice(b"bpfpoly!");
        h
    }

    pub fn ipv4_header(proto: u8, payload_len: usize, option_words: u8) -> Vec<u8> {
        let ihl = 5 + option_words;
        let total = usize::from(ihl) * 4 + payload_len;
        let mut h = vec![0x40 | ihl, 0];
        h.extend_from_slice(&(total as u16).to_be_bytes());
        h.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        h.extend(std::iter::repeat_n(1u8, usize::from(option_words) * 4)); // NOPs
        h
    }

    pub fn ipv6_header(next: u8, payload_len: usize) -> Vec<u8> {
        let mut h = vec![0x60, 0, 0, 0];
        h.extend_from_slice(&(payload_len as u16).to_be_bytes());
        h.extend_from_slice(&[next, 64]);
        h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        h
    }

    pub fn ipv4_in(mut frame: Vec<u8>, proto: u8, option_words: u8) -> Vec<u8> {
        let l4 = l4(proto);
        frame.extend(ipv4_header(proto, l4.len(), option_words));
        frame.extend(l4);
        frame
    }

    pub fn ipv4(proto: u8) -> Vec<u8> {
        ipv4_in(eth(ETH_P_IP), proto, 0)
    }

    pub fn ipv6_in(mut frame: Vec<u8>, proto: u8) -> Vec<u8> {
        let l4 = l4(proto);
        frame.extend(ipv6_header(proto, l4.len()));
        frame.extend(l4);
        frame
    }

    pub fn ipv6(proto: u8) -> Vec<u8> {
        ipv6_in(eth(ETH_P_IPV6), proto)
    }

    /// IPv6 with a hop-by-hop options header (8 bytes) before `proto`.
    pub fn ipv6_hop_by_hop(proto: u8) -> Vec<u8> {
        let l4 = l4(proto);
        let mut f = eth(ETH_P_IPV6);
        f.extend(ipv6_header(0, 8 + l4.len()));
        f.extend_from_slice(&[proto, 0, 1, 4, 0, 0, 0, 0]); // PadN
        f.extend(l4);
        f
    }
}

/// One frame, and where it must go: Some(key) = that handler, None = default path.
pub struct Case {
    pub name: &'static str,
    pub frame: Vec<u8>,
    pub key: Option<u32>,
}

pub fn case(name: &'static str, frame: Vec<u8>, key: Option<u32>) -> Case {
    Case { name, frame, key }
}

/// The frames of the dispatch matrix (vlan_aware = true).
pub fn matrix() -> Vec<Case> {
    use frames::*;
    let tcp4 = ipv4(IPPROTO_TCP);
    vec![
        case("ipv4/tcp", tcp4.clone(), Some(6)),
        case("ipv4/udp", ipv4(IPPROTO_UDP), Some(17)),
        case("ipv4/icmp", ipv4(IPPROTO_ICMP), Some(1)),
        case(
            "ipv4+options/tcp",
            ipv4_in(eth(ETH_P_IP), IPPROTO_TCP, 2),
            Some(6),
        ),
        case("ipv6/tcp", ipv6(IPPROTO_TCP), Some(6)),
        case("ipv6/udp", ipv6(IPPROTO_UDP), Some(17)),
        case("ipv6/icmpv6 (key 1)", ipv6(IPPROTO_ICMPV6), Some(1)),
        case(
            "ipv6+hop-by-hop/udp",
            ipv6_hop_by_hop(IPPROTO_UDP),
            Some(17),
        ),
        case(
            "vlan/ipv4/tcp",
            ipv4_in(eth_vlan(&[(ETH_P_8021Q, 100)], ETH_P_IP), IPPROTO_TCP, 0),
            Some(6),
        ),
        case(
            "vlan/ipv6/udp",
            ipv6_in(eth_vlan(&[(ETH_P_8021Q, 200)], ETH_P_IPV6), IPPROTO_UDP),
            Some(17),
        ),
        case(
            "qinq/ipv4/icmp",
            ipv4_in(
                eth_vlan(&[(ETH_P_8021AD, 10), (ETH_P_8021Q, 20)], ETH_P_IP),
                IPPROTO_ICMP,
                0,
            ),
            Some(1),
        ),
        // Parsed, but no handler for key 47: default path.
        case("ipv4/gre (no slot)", ipv4(IPPROTO_GRE), None),
        // Truncated.
        case("ethernet header only", eth(ETH_P_IP), None),
        case("ipv4 header cut", tcp4[..14 + 10].to_vec(), None),
        case("tcp header cut", tcp4[..14 + 20 + 10].to_vec(), None),
        case(
            "ipv6 header cut",
            ipv6(IPPROTO_UDP)[..14 + 30].to_vec(),
            None,
        ),
        case(
            "vlan tag cut",
            eth_vlan(&[(ETH_P_8021Q, 5)], ETH_P_IP)[..16].to_vec(),
            None,
        ),
        // Garbage and non-IP.
        case(
            "arp",
            {
                let mut f = eth(ETH_P_ARP);
                f.extend_from_slice(&[0u8; 28]);
                f
            },
            None,
        ),
        case(
            "garbage ethertype",
            (0..64u8).map(|b| b.wrapping_mul(37)).collect(),
            None,
        ),
        case(
            "ipv4 ethertype, version 6",
            {
                let mut f = tcp4.clone();
                f[14] = 0x65;
                f
            },
            None,
        ),
        case(
            "ipv4 ihl 2",
            {
                let mut f = tcp4.clone();
                f[14] = 0x42;
                f
            },
            None,
        ),
        case(
            "ipv4 ihl 15 past the end",
            {
                let mut f = tcp4.clone();
                f[14] = 0x4f;
                f
            },
            None,
        ),
    ]
}

/// A loaded classifier with its handlers in jump_table.
pub struct Classifier {
    pub ebpf: Ebpf,
    // Keeps the table's user reference: the kernel empties a PROG_ARRAY when
    // its last user-space reference goes away.
    pub _table: Option<ProgramArray<MapData>>,
}

#[derive(Clone, Copy)]
pub struct Config {
    pub count_bytes: bool,
    pub vlan_aware: bool,
    /// bpfpoly_dispatch_mode: 0 tail call, 1 static, 2 freplace.
    pub mode: u32,
    /// bpfpoly_handler_mask (static dispatch).
    pub mask: u64,
}

pub const ALL_HANDLERS_MASK: u64 = (1 << 1) | (1 << 6) | (1 << 17);

pub const DEFAULT_CONFIG: Config = Config {
    count_bytes: true,
    vlan_aware: true,
    mode: 0,
    mask: ALL_HANDLERS_MASK,
};

impl Classifier {
    pub fn loader(config: &Config) -> EbpfLoader<'_> {
        let flag = |b: bool| if b { &1u8 } else { &0u8 };
        let mut loader = EbpfLoader::new();
        loader
            .override_global("count_bytes", flag(config.count_bytes), true)
            .override_global("vlan_aware", flag(config.vlan_aware), true)
            .override_global("bpfpoly_dispatch_mode", &config.mode, true)
            .override_global("bpfpoly_handler_mask", &config.mask, true);
        loader
    }

    /// Loads `object` (XDP or TC) with every program, and fills `slots`.
    pub fn load(object_name: &str, config: Config, slots: &[(&str, u32)]) -> Self {
        let mut ebpf = Self::loader(&config)
            .load(object(object_name))
            .unwrap_or_else(|e| panic!("{object_name}: {e}"));
        for (name, result) in load_all_programs(&mut ebpf) {
            if let Err(e) = result {
                panic!("{object_name}/{name}: {e}");
            }
        }
        Self::from_loaded(ebpf, slots)
    }

    pub fn from_loaded(mut ebpf: Ebpf, slots: &[(&str, u32)]) -> Self {
        if slots.is_empty() {
            return Self { ebpf, _table: None };
        }
        let mut table = ProgramArray::try_from(ebpf.take_map("jump_table").expect("jump_table"))
            .expect("jump_table is a PROG_ARRAY");
        for &(handler, key) in slots {
            let fd = ebpf
                .program(handler)
                .expect("handler")
                .fd()
                .expect("handler loaded");
            table.set(key, fd, 0).expect("filling jump_table");
        }
        Self {
            ebpf,
            _table: Some(table),
        }
    }

    pub fn run(&self, frame: &[u8]) -> Result<u32, ProgramError> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::default()
        };
        let program = self.ebpf.program("classify").expect("classify");
        let result = match program {
            aya::programs::Program::Xdp(p) => Xdp::test_run(p, opts),
            aya::programs::Program::SchedClassifier(p) => SchedClassifier::test_run(p, opts),
            _ => panic!("classify is neither XDP nor TC"),
        }?;
        Ok(result.return_value)
    }

    pub fn run_expect(&self, frame: &[u8], verdict: u32) {
        let got = self.run(frame).expect("BPF_PROG_TEST_RUN");
        assert_eq!(got, verdict, "verdict for a {}-byte frame", frame.len());
    }

    pub fn per_cpu_sum<const N: usize>(&self, map: &str, key: u32) -> [u64; N] {
        let array: PerCpuArray<_, [u64; N]> =
            PerCpuArray::try_from(self.ebpf.map(map).expect(map)).expect(map);
        let values = array.get(&key, 0).expect("reading a per-CPU slot");
        let mut sum = [0u64; N];
        for v in values.iter() {
            for (s, x) in sum.iter_mut().zip(v) {
                *s += x;
            }
        }
        sum
    }

    /// Non-zero slots of bpfpoly_dispatch (0..=256), summed over CPUs.
    pub fn dispatch_counts(&self) -> BTreeMap<u32, u64> {
        (0..=DEFAULT_SLOT)
            .filter_map(|k| {
                let [n] = self.per_cpu_sum::<1>("bpfpoly_dispatch", k);
                (n != 0).then_some((k, n))
            })
            .collect()
    }

    /// Non-zero entries of classifier_stats: key -> (packets, bytes).
    pub fn stats(&self) -> BTreeMap<u32, (u64, u64)> {
        (0..DEFAULT_SLOT)
            .filter_map(|k| {
                let [packets, bytes] = self.per_cpu_sum::<2>("classifier_stats", k);
                (packets != 0 || bytes != 0).then_some((k, (packets, bytes)))
            })
            .collect()
    }
}

pub const ALL_SLOTS: &[(&str, u32)] = &[("handle_icmp", 1), ("handle_tcp", 6), ("handle_udp", 17)];

/// What BPF_PROG_TEST_RUN does with a frame before the program sees it.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Hook {
    /// XDP: runs every frame of at least ETH_HLEN (14) bytes.
    Xdp,
    /// TC (skb): also refuses, with EINVAL, a frame whose ethertype is IPv4 or
    /// IPv6 but which is shorter than that L3 header (it pulls the header).
    Tc,
}

impl Hook {
    pub fn refuses(self, frame: &[u8]) -> bool {
        if frame.len() < 14 {
            return true;
        }
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        self == Hook::Tc
            && ((ethertype == frames::ETH_P_IP && frame.len() < 14 + 20)
                || (ethertype == frames::ETH_P_IPV6 && frame.len() < 14 + 40))
    }
}

/// What running a set of cases must leave in the maps.
#[derive(Default, Debug)]
pub struct Expected {
    pub dispatch: BTreeMap<u32, u64>,
    pub stats: BTreeMap<u32, (u64, u64)>,
    pub refused: Vec<&'static str>,
}

/// Runs the cases, asserting each verdict (or the kernel's EINVAL).
pub fn run_matrix(
    classifier: &Classifier,
    cases: &[Case],
    hook: Hook,
    verdict: u32,
    count_bytes: bool,
) -> Expected {
    let mut expected = Expected::default();
    for c in cases {
        let result = classifier.run(&c.frame);
        if hook.refuses(&c.frame) {
            let err = result.expect_err(c.name);
            assert_eq!(errno(&err), Some(EINVAL), "{}: {err}", c.name);
            expected.refused.push(c.name);
            continue;
        }
        let got = result.unwrap_or_else(|e| panic!("{}: {e:?}", c.name));
        assert_eq!(got, verdict, "{}: verdict", c.name);
        let slot = c.key.unwrap_or(DEFAULT_SLOT);
        *expected.dispatch.entry(slot).or_insert(0) += 1;
        if let Some(key) = c.key {
            let entry = expected.stats.entry(key).or_insert((0, 0));
            entry.0 += 1;
            if count_bytes {
                entry.1 += c.frame.len() as u64;
            }
        }
    }
    expected
}

pub fn assert_matrix(object_name: &str, hook: Hook, verdict: u32) {
    let classifier = Classifier::load(object_name, DEFAULT_CONFIG, ALL_SLOTS);
    let expected = run_matrix(&classifier, &matrix(), hook, verdict, true);
    // Spelled out, so a wrong case table cannot hide a wrong program.
    let (default_path, refused): (u64, &[&str]) = match hook {
        Hook::Xdp => (11, &[]),
        Hook::Tc => (
            8,
            &["ethernet header only", "ipv4 header cut", "ipv6 header cut"],
        ),
    };
    assert_eq!(
        expected.refused, refused,
        "{object_name}: refused by the kernel"
    );
    assert_eq!(
        expected.dispatch,
        BTreeMap::from([(1, 3), (6, 4), (17, 4), (DEFAULT_SLOT, default_path)]),
        "{object_name}: expected dispatch per slot"
    );
    assert_eq!(
        classifier.dispatch_counts(),
        expected.dispatch,
        "{object_name}: bpfpoly_dispatch"
    );
    assert_eq!(
        classifier.stats(),
        expected.stats,
        "{object_name}: classifier_stats"
    );
}
