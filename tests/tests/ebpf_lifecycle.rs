//! Lifecycle: hitless eBPF re-applies under traffic, and the source check
//! on bound ports (both backends). (A failure part-way through an apply is tested
//! without root in `sgfw::ebpf`'s unit tests, with a map store that fails
//! at every possible write.)

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sgfw::model::IpPermission;
use sgfw_tests::scenario::{Backend, Lab, Probe, all_anywhere, sg};

/// "Re-applying a changed model never exposes a half-written policy":
/// an allowed UDP flow (one 5-tuple, tracked) keeps getting every reply
/// while the model is re-applied 1,000 times, and a denied flow never gets
/// through during the churn.
#[test]
fn thousand_reapplies_lose_no_reply_and_leak_nothing() {
    if !sgfw_tests::require_root("churn") {
        return;
    }
    let mut lab = Lab::new(Backend::Ebpf, &["a", "b"], &[("client", 0), ("server", 1)]);
    // Two models that differ (an unrelated rule comes and goes), so every
    // apply writes a new generation.
    let with_extra = |extra: bool| {
        let mut ingress = vec![IpPermission::udp(7000, 7000).from_group("sg-client")];
        if extra {
            ingress.push(IpPermission::tcp(9000, 9100).from_cidr("192.0.2.0/24"));
        }
        lab.model(
            &[("client", &["sg-client"]), ("server", &["sg-server"])],
            vec![
                sg("sg-client", vec![], vec![all_anywhere()]),
                sg("sg-server", ingress, vec![all_anywhere()]),
            ],
            vec![],
        )
    };
    let (m1, m2) = (with_extra(false), with_extra(true));
    lab.serve("server", &[], &[7000, 7001]);
    lab.apply(&m1);
    let server = IpAddr::V4(lab.bed.instance("server").v4);

    let stop = Arc::new(AtomicBool::new(false));
    let (sent, lost, leaked, probes) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let allowed = lab.bed.udp_socket("client", false).unwrap();
    allowed
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let busy = {
        let (stop, sent, lost) = (stop.clone(), sent.clone(), lost.clone());
        std::thread::spawn(move || {
            let to = SocketAddr::new(server, 7000);
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                let msg = n.to_be_bytes();
                allowed.send_to(&msg, to).unwrap();
                match allowed.recv_from(&mut buf) {
                    Ok((8, _)) if buf[..8] == msg => {}
                    _ => {
                        lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let denied = lab.bed.udp_socket("client", false).unwrap();
    denied
        .set_read_timeout(Some(Duration::from_millis(20)))
        .unwrap();
    let attacker = {
        let (stop, leaked, probes) = (stop.clone(), leaked.clone(), probes.clone());
        std::thread::spawn(move || {
            let to = SocketAddr::new(server, 7001);
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                probes.fetch_add(1, Ordering::Relaxed);
                denied.send_to(b"leak?", to).unwrap();
                if denied.recv_from(&mut buf).is_ok() {
                    leaked.fetch_add(1, Ordering::Relaxed);
                }
            }
            denied
                .set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            while denied.recv_from(&mut buf).is_ok() {
                leaked.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // 1,000 applies at least, and on until the denied flow was probed often
    // enough (the prober shares two cores with the applies).
    let mut applies = 0u32;
    while applies < 1000 || (probes.load(Ordering::Relaxed) <= 20 && applies < 20_000) {
        lab.apply(if applies.is_multiple_of(2) { &m2 } else { &m1 });
        applies += 1;
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();
    attacker.join().unwrap();
    let (sent, lost, leaked, probes) = (
        sent.load(Ordering::Relaxed),
        lost.load(Ordering::Relaxed),
        leaked.load(Ordering::Relaxed),
        probes.load(Ordering::Relaxed),
    );
    eprintln!(
        "churn: {applies} applies; {sent} request/replies on the allowed flow, {lost} lost; {probes} denied probes, {leaked} leaked"
    );
    assert!(sent > 1000, "the allowed flow was not kept busy: {sent}");
    assert_eq!(lost, 0, "replies lost during re-applies");
    assert!(probes > 20, "the denied flow was not exercised: {probes}");
    assert_eq!(leaked, 0, "a denied flow got through during re-applies");
}

/// "When an instance names its Interface, a packet from that port with a
/// source address that is not the instance's is dropped."
#[test]
fn bound_port_drops_spoofed_sources_ebpf() {
    if sgfw_tests::require_root("source_check_ebpf") {
        spoofed_sources_are_dropped(Backend::Ebpf);
    }
}

#[test]
fn bound_port_drops_spoofed_sources_nftables() {
    if sgfw_tests::require_root("source_check_nftables") {
        spoofed_sources_are_dropped(Backend::Nft);
    }
}

#[expect(
    clippy::unwrap_used,
    reason = "test code: a failed step is a failed test"
)]
fn spoofed_sources_are_dropped(backend: Backend) {
    let mut lab = Lab::new(backend, &["a"], &[("a1", 0), ("a2", 0)]);
    let model = lab.model(
        &[("a1", &["sg-open"]), ("a2", &["sg-open"])],
        vec![sg("sg-open", vec![all_anywhere()], vec![all_anywhere()])],
        vec![],
    );
    lab.apply(&model);
    // An address of a1's subnet that the model does not give a1.
    let a1 = lab.bed.instance("a1").v4;
    let spoof = std::net::Ipv4Addr::new(a1.octets()[0], a1.octets()[1], a1.octets()[2], 200);
    lab.bed
        .exec(
            "a1",
            &["ip", "addr", "add", &format!("{spoof}/24"), "dev", "eth0"],
        )
        .unwrap();
    let a2 = lab.bed.instance("a2").v4.to_string();
    let ping_from = |src: &str| {
        lab.bed
            .exec(
                "a1",
                &["ping", "-n", "-q", "-c", "1", "-W", "0.5", "-I", src, &a2],
            )
            .is_ok()
    };
    assert!(
        ping_from(&a1.to_string()),
        "the instance's own address must work"
    );
    assert!(
        !ping_from(&spoof.to_string()),
        "a spoofed source left a bound port"
    );
    lab.expect("a1", "a2", false, Probe::Ping, true);
}

/// Whether the kernel has an XDP program on a port in native mode.
fn native_xdp(port: &str) -> bool {
    sgfw_tests::testbed::sh(&["ip", "-d", "link", "show", "dev", port])
        .unwrap_or_default()
        .contains(" xdp ")
}

/// The XDP pre-filter's lifecycle: attached (native) to every port with
/// `Dataplane::Xdp`, detached when the dataplane is TC again while TC keeps
/// enforcing, attached again, and gone with everything else at teardown;
/// the verdicts are the same at every step.
#[test]
fn xdp_attach_switch_and_teardown_leave_nothing() {
    if !sgfw_tests::require_root("xdp lifecycle") {
        return;
    }
    let mut lab = Lab::new(Backend::Xdp, &["a", "b"], &[("client", 0), ("server", 1)]);
    let m = lab.model(
        &[("client", &["sg-client"]), ("server", &["sg-server"])],
        vec![
            sg(
                "sg-client",
                vec![],
                vec![IpPermission::tcp(80, 80).from_cidr("0.0.0.0/0")],
            ),
            sg(
                "sg-server",
                vec![
                    IpPermission::tcp(80, 80).from_group("sg-client"),
                    IpPermission::tcp(81, 81).from_group("sg-client"),
                ],
                vec![],
            ),
        ],
        vec![],
    );
    lab.serve("server", &[80, 81], &[]);
    let ports: Vec<String> = lab.bed.instances.iter().map(|i| i.port.clone()).collect();
    let check = |lab: &Lab, xdp: bool, when: &str| {
        for p in &ports {
            assert_eq!(native_xdp(p), xdp, "{when}: XDP on {p}");
        }
        // 80 is allowed both ways; 81 the server would take, but the
        // client's egress denies it: at XDP when it is there, else at TC.
        lab.expect("client", "server", false, Probe::Tcp(80), true);
        lab.expect("client", "server", false, Probe::Tcp(81), false);
    };
    lab.apply(&m);
    check(&lab, true, "xdp apply");
    lab.set_dataplane(false);
    lab.apply(&m);
    check(&lab, false, "re-applied with tc");
    lab.set_dataplane(true);
    lab.apply(&m);
    check(&lab, true, "re-applied with xdp");
    lab.ebpf().teardown().unwrap();
    for p in &ports {
        assert!(!native_xdp(p), "XDP left on {p} after teardown");
    }
    assert!(
        !lab.ebpf().pin_root.exists(),
        "pins left after teardown: {}",
        lab.ebpf().pin_root.display()
    );
}
