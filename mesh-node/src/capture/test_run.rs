//! The inbound program, run by the kernel (`BPF_PROG_TEST_RUN`) over a corpus of packets,
//! each with the verdict it must get. Nothing is attached or pinned: the programs and maps go
//! when the test drops them.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    maps::{Array, HashMap},
    programs::SchedClassifier,
    Ebpf, EbpfLoader,
};
use mesh_ebpf_common::{names, INBOUND_STRICT, PLAINTEXT_PORT};

use super::{sys::Attr, OBJECT};

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const NEXT: i32 = -1;
const DROP: i32 = 2;
const TUNNEL: u16 = 15008;
const CLOSED: u16 = 8080;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const RST: u8 = 0x04;

struct Loaded {
    ebpf: Ebpf,
}

impl Loaded {
    fn new(mode: u32) -> Self {
        let mut ebpf = EbpfLoader::new().load(OBJECT).expect("load the object");
        let prog: &mut SchedClassifier = ebpf
            .program_mut(names::INBOUND)
            .expect("inbound program")
            .try_into()
            .expect("a classifier");
        prog.load()
            .expect("the verifier accepts the inbound program");
        let mut open: HashMap<_, u16, u32> =
            HashMap::try_from(ebpf.map_mut(names::OPEN_PORTS).expect("map")).expect("map");
        open.insert(TUNNEL, 1, 0).expect("open port");
        let mut modes: Array<_, u32> =
            Array::try_from(ebpf.map_mut(names::INBOUND_MODE).expect("map")).expect("map");
        modes.set(0, mode, 0).expect("mode");
        Self { ebpf }
    }

    /// The program's return value for `packet`.
    fn run(&self, packet: &[u8]) -> std::io::Result<i32> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(names::INBOUND)
            .expect("inbound program")
            .try_into()
            .expect("a classifier");
        let fd = prog.fd().expect("loaded").as_fd().as_raw_fd();
        let mut attr = Attr::default();
        attr.put_u32(0, fd as u32);
        attr.put_u32(8, packet.len() as u32);
        attr.put_u64(16, packet.as_ptr() as u64);
        attr.put_u32(32, 1);
        attr.sys(BPF_PROG_TEST_RUN)?;
        Ok(attr.get_u32(4) as i32)
    }
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// `tags` VLAN tags (802.1ad outside, 802.1Q inside), then `ethertype`.
fn vlan(tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut inner = Vec::new();
    for (i, _) in tags.iter().enumerate() {
        inner.extend_from_slice(&[0, 7]);
        let next = tags.get(i + 1).copied().unwrap_or(ethertype);
        inner.extend_from_slice(&next.to_be_bytes());
    }
    inner.extend_from_slice(payload);
    eth(tags[0], &inner)
}

fn tcp(dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&40000u16.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        5 << 4,
        flags,
        0xff,
        0xff,
        0,
        0,
        0,
        0,
    ]);
    t.extend_from_slice(data);
    t
}

fn udp(dport: u16) -> Vec<u8> {
    let mut u = 40000u16.to_be_bytes().to_vec();
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&[0, 12, 0, 0, b'h', b'i', b'!', b'!']);
    u
}

/// An IPv4 header (with `options` words of options) and `payload`.
fn ipv4_with(version_ihl: u8, proto: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
    let ihl = usize::from(version_ihl & 0x0f).max(5);
    let mut h = vec![version_ihl, 0];
    h.extend_from_slice(&((ihl * 4 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    h.resize(ihl * 4, 1);
    h.extend_from_slice(payload);
    h
}

fn ipv4(proto: u8, payload: &[u8]) -> Vec<u8> {
    eth(0x0800, &ipv4_with(0x45, proto, 0, payload))
}

fn ipv6_raw(next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    h.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    h.extend_from_slice(payload);
    h
}

fn ipv6(next: u8, payload: &[u8]) -> Vec<u8> {
    eth(0x86dd, &ipv6_raw(next, payload))
}

/// An extension header of `units` + 1 eight-octet units, then `rest`.
fn ext(next: u8, units: u8, rest: &[u8]) -> Vec<u8> {
    let mut h = vec![next, units];
    h.resize((usize::from(units) + 1) * 8, 0);
    h.extend_from_slice(rest);
    h
}

fn frag6(next: u8, offset_units: u16, more: bool, rest: &[u8]) -> Vec<u8> {
    let field = (offset_units << 3) | u16::from(more);
    let mut h = vec![next, 0];
    h.extend_from_slice(&field.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 9]);
    h.extend_from_slice(rest);
    h
}

fn corpus() -> Vec<(&'static str, Vec<u8>, i32)> {
    let syn = tcp(CLOSED, SYN, b"");
    let syn_open = tcp(TUNNEL, SYN, b"");
    // Nine destination-options headers, then the SYN.
    let mut nine_headers = syn.clone();
    for i in 0..9 {
        nine_headers = ext(if i == 0 { 6 } else { 60 }, 0, &nine_headers);
    }
    vec![
        ("IPv4 SYN to a closed port", ipv4(6, &syn), DROP),
        ("IPv4 SYN to the tunnel port", ipv4(6, &syn_open), NEXT),
        (
            "IPv4 SYN with data",
            ipv4(6, &tcp(CLOSED, SYN, b"GET / HTTP/1.0")),
            DROP,
        ),
        (
            "IPv4 SYN with FIN",
            ipv4(6, &tcp(CLOSED, SYN | 1, b"")),
            DROP,
        ),
        ("IPv4 SYN-ACK", ipv4(6, &tcp(CLOSED, SYN | ACK, b"")), NEXT),
        ("IPv4 ACK", ipv4(6, &tcp(CLOSED, ACK, b"data")), NEXT),
        ("IPv4 RST", ipv4(6, &tcp(CLOSED, RST, b"")), NEXT),
        ("IPv4 UDP", ipv4(17, &udp(CLOSED)), NEXT),
        ("IPv4 ICMP", ipv4(1, &[8, 0, 0, 0, 0, 1, 0, 1]), NEXT),
        ("ARP", eth(0x0806, &[0, 1, 8, 0, 6, 4, 0, 1]), NEXT),
        (
            "IPv4 with options, SYN",
            eth(0x0800, &ipv4_with(0x46, 6, 0, &syn)),
            DROP,
        ),
        (
            "IPv4 with options, SYN to the tunnel port",
            eth(0x0800, &ipv4_with(0x47, 6, 0, &syn_open)),
            NEXT,
        ),
        (
            "IPv4 header length 4",
            eth(0x0800, &ipv4_with(0x44, 6, 0, &syn)),
            DROP,
        ),
        (
            "IPv6 version under the IPv4 type",
            eth(0x0800, &ipv4_with(0x65, 6, 0, &syn)),
            DROP,
        ),
        ("IPv4 TCP header cut at 8 bytes", ipv4(6, &syn[..8]), DROP),
        // (The kernel's test runner refuses IP packets shorter than their fixed header, so a
        // cut short header is tested one layer up.)
        (
            "IPv6 header, TCP missing",
            eth(0x86dd, &ipv6_raw(6, &[])),
            DROP,
        ),
        (
            "IPv4 tiny first fragment (8 bytes of TCP)",
            eth(0x0800, &ipv4_with(0x45, 6, 0x2000, &syn[..8])),
            DROP,
        ),
        (
            "IPv4 first fragment with a whole SYN header",
            eth(0x0800, &ipv4_with(0x45, 6, 0x2000, &syn)),
            DROP,
        ),
        (
            "IPv4 later TCP fragment (overlapping the flags)",
            eth(0x0800, &ipv4_with(0x45, 6, 1, &syn[8..])),
            DROP,
        ),
        (
            "IPv4 last TCP fragment",
            eth(0x0800, &ipv4_with(0x45, 6, 3, &[0; 8])),
            DROP,
        ),
        (
            "IPv4 UDP fragment",
            eth(0x0800, &ipv4_with(0x45, 17, 0x2000, &udp(CLOSED))),
            NEXT,
        ),
        ("IPv4 ESP", ipv4(50, &[0, 0, 1, 0, 0, 0, 0, 1, 9, 9]), DROP),
        ("IPv4 AH", ipv4(51, &ext(6, 1, &syn)), DROP),
        ("IPv6 SYN to a closed port", ipv6(6, &syn), DROP),
        ("IPv6 SYN to the tunnel port", ipv6(6, &syn_open), NEXT),
        ("IPv6 SYN-ACK", ipv6(6, &tcp(CLOSED, SYN | ACK, b"")), NEXT),
        ("IPv6 hop-by-hop, SYN", ipv6(0, &ext(6, 0, &syn)), DROP),
        (
            "IPv6 hop-by-hop, SYN to the tunnel port",
            ipv6(0, &ext(6, 0, &syn_open)),
            NEXT,
        ),
        (
            "IPv6 hop-by-hop, routing, destination options, SYN",
            ipv6(0, &ext(43, 1, &ext(60, 2, &ext(6, 0, &syn)))),
            DROP,
        ),
        (
            "IPv6 first fragment of a SYN",
            ipv6(44, &frag6(6, 0, true, &syn[..16])),
            DROP,
        ),
        (
            "IPv6 later fragment of TCP",
            ipv6(44, &frag6(6, 2, false, &syn[16..])),
            DROP,
        ),
        (
            "IPv6 atomic fragment of a SYN",
            ipv6(44, &frag6(6, 0, false, &syn)),
            DROP,
        ),
        (
            "IPv6 destination options inside a fragment",
            ipv6(44, &frag6(60, 0, true, &ext(6, 0, &syn))),
            DROP,
        ),
        (
            "IPv6 UDP fragment",
            ipv6(44, &frag6(17, 0, true, &udp(CLOSED))),
            NEXT,
        ),
        (
            "IPv6 nine extension headers, SYN",
            ipv6(60, &nine_headers),
            DROP,
        ),
        ("IPv6 extension header cut short", ipv6(0, &[6]), DROP),
        (
            "IPv6 extension header longer than the packet",
            ipv6(0, &[6, 4, 0, 0, 0, 0, 0, 0]),
            DROP,
        ),
        ("IPv6 AH", ipv6(51, &ext(6, 1, &syn)), DROP),
        ("IPv6 ESP", ipv6(50, &[0, 0, 1, 0, 0, 0, 0, 1]), DROP),
        ("IPv6 UDP", ipv6(17, &udp(CLOSED)), NEXT),
        (
            "IPv6 ICMPv6 neighbour solicitation",
            ipv6(58, &[135, 0, 0, 0, 0, 0, 0, 0]),
            NEXT,
        ),
        ("IPv6 no next header", ipv6(59, &[]), NEXT),
        (
            "IPv4 version under the IPv6 type",
            eth(0x86dd, &ipv4_with(0x45, 6, 0, &syn)),
            DROP,
        ),
        (
            "VLAN, IPv4 SYN",
            vlan(&[0x8100], 0x0800, &ipv4_with(0x45, 6, 0, &syn)),
            DROP,
        ),
        (
            "VLAN, IPv4 SYN to the tunnel port",
            vlan(&[0x8100], 0x0800, &ipv4_with(0x45, 6, 0, &syn_open)),
            NEXT,
        ),
        ("VLAN, ARP", vlan(&[0x8100], 0x0806, &[0, 1, 8, 0]), NEXT),
        (
            "QinQ, IPv6 SYN",
            vlan(&[0x88a8, 0x8100], 0x86dd, &ipv6_raw(6, &syn)),
            DROP,
        ),
        (
            "three VLAN tags, IPv4 SYN-ACK",
            vlan(
                &[0x88a8, 0x8100, 0x8100],
                0x0800,
                &ipv4_with(0x45, 6, 0, &tcp(CLOSED, SYN | ACK, b"")),
            ),
            DROP,
        ),
        ("VLAN tag cut short", eth(0x8100, &[0, 7]), DROP),
    ]
}

/// Regression (issue 19): the inbound program let through what it could not parse (a
/// packet too short, a tiny or later IPv4 fragment, an IPv6 packet with extension headers),
/// so a plaintext SYN could reach a STRICT pod in pieces or behind an extension header.
#[test]
fn the_inbound_program_drops_what_it_cannot_classify() {
    let strict = Loaded::new(INBOUND_STRICT);
    let mut wrong = Vec::new();
    for (name, packet, expected) in corpus() {
        match strict.run(&packet) {
            Ok(got) if got == expected => {}
            Ok(got) => wrong.push(format!("{name}: {got}, expected {expected}")),
            Err(e) => wrong.push(format!("{name}: {e}")),
        }
    }
    assert!(wrong.is_empty(), "wrong verdicts:\n{}", wrong.join("\n"));
    // Before the first config sets a mode, the program lets everything through.
    let unset = Loaded::new(0);
    assert_eq!(unset.run(&ipv4(6, &tcp(CLOSED, SYN, b""))).unwrap(), NEXT);
    // PERMISSIVE hands SYNs to the plaintext listener, which this test's netns lacks.
    let permissive = Loaded::new(mesh_ebpf_common::INBOUND_PERMISSIVE);
    let run = |p: &[u8]| permissive.run(p).unwrap();
    assert_eq!(run(&ipv4(6, &tcp(CLOSED, SYN, b""))), DROP);
    assert_eq!(run(&ipv4(6, &tcp(PLAINTEXT_PORT, ACK, b""))), NEXT);
}
