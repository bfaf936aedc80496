//! Ports not attached yet, for real (eBPF): a veth re-created as a container
//! runtime does on a restart (same names and addresses, a new ifindex, no
//! hooks), with nothing attaching it. Every instance admits and sends
//! anything, so only the fence can stop a datagram; each check is one-way
//! (a socket in the receiving namespace that must get nothing), since the
//! TC fence already stops any reply.
//!
//! docs/semantics.md, "Ports not attached yet": nothing such a port sends
//! reaches an instance or the host, nothing reaches such a port from an
//! attached port or from the host, and two such ports do not reach each
//! other; once attached, the policy judges them (here: delivered).
#![expect(
    clippy::unwrap_used,
    reason = "test code: a failed step is a failed test"
)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use sgfw::model::IpPermission;
use sgfw_tests::require_root;
use sgfw_tests::scenario::{Backend, Lab, sg};

/// Whether a datagram sent by `send` arrives at `rx` within 300 ms.
fn arrives(rx: &UdpSocket, send: impl FnOnce(SocketAddr)) -> bool {
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 64];
    while rx.recv(&mut buf).is_ok() {}
    let port = rx.local_addr().unwrap().port();
    send(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port));
    rx.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    matches!(rx.recv(&mut buf), Ok(n) if &buf[..n] == b"sgfw-fence")
}

#[test]
fn ports_not_attached_yet_are_fenced_both_ways() {
    if !require_root("ports_not_attached_yet_are_fenced_both_ways") {
        return;
    }
    let mut lab = Lab::new(Backend::Ebpf, &["a"], &[("a1", 0), ("n1", 0), ("n2", 0)]);
    let open = IpPermission::all().from_cidr("0.0.0.0/0").from_cidr("::/0");
    let model = lab.model(
        &[
            ("a1", &["sg-open"]),
            ("n1", &["sg-open"]),
            ("n2", &["sg-open"]),
        ],
        vec![sg("sg-open", vec![open.clone()], vec![open])],
        vec![],
    );
    lab.apply(&model);
    let (a1, n1, n2) = (
        lab.addr("a1", false),
        lab.addr("n1", false),
        lab.addr("n2", false),
    );
    let rx_n1 = lab.bed.udp_socket("n1", false).unwrap();
    let rx_a1 = lab.bed.udp_socket("a1", false).unwrap();
    let tx = |from: &str| lab.bed.udp_socket(from, false).unwrap();
    let send = |s: UdpSocket, to: IpAddr| {
        move |port: SocketAddr| {
            let _ = s.send_to(b"sgfw-fence", SocketAddr::new(to, port.port()));
        }
    };
    let host_send = |to: IpAddr| {
        move |port: SocketAddr| {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            let _ = s.send_to(b"sgfw-fence", SocketAddr::new(to, port.port()));
        }
    };
    let cases = |lab: &Lab, label: &str, want: bool, failures: &mut Vec<String>| {
        let _ = lab;
        for (what, got) in [
            ("a1 -> n1", arrives(&rx_n1, send(tx("a1"), n1))),
            ("n2 -> n1", arrives(&rx_n1, send(tx("n2"), n1))),
            ("host -> n1", arrives(&rx_n1, host_send(n1))),
            ("n1 -> a1", arrives(&rx_a1, send(tx("n1"), a1))),
            ("n1 -> n2", {
                let rx_n2 = lab.bed.udp_socket("n2", false).unwrap();
                arrives(&rx_n2, send(tx("n1"), n2))
            }),
        ] {
            if got != want {
                failures.push(format!("{label}: {what}: got {got}, want {want}"));
            }
        }
    };
    let mut failures = Vec::new();
    cases(&lab, "all attached", true, &mut failures);
    assert!(
        failures.is_empty(),
        "the bed does not work:\n{}",
        failures.join("\n")
    );
    // Restarts: n1 and n2 get new veths that nothing attaches.
    lab.bed.replug("n1").unwrap();
    lab.bed.replug("n2").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    cases(&lab, "not attached", false, &mut failures);
    // What the watcher does on the link events: attach, and judge.
    let attached = lab.attach_ports();
    assert_eq!(attached.len(), 2, "attached {attached:?}");
    cases(&lab, "attached again", true, &mut failures);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    drop(lab);
}
