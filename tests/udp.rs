//! UDP flow forwarding end to end, on real loopback sockets: a real DNS server answered
//! through the balancer by a real client, datagram-exact echo with many clients, idle
//! expiry, `responses`, `max_flows`, failover (backend down, maint, ICMP port unreachable;
//! drain keeps flows), the fallback pool, Maglev stickiness per client address and port,
//! the access log record of a flow, and upstream sockets reused by short flows: what a late
//! reply does with reuse (dropped while the socket rests; passed to the next flow of the
//! socket once it holds it) and without it (never passed to a later client).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use switchyard::backend::{AdminState, Health};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// How a test backend answers a datagram.
#[derive(Clone, Copy)]
enum Reply {
    /// The same bytes back.
    Echo,
    /// `name:` and the bytes.
    Named,
    /// `first:` + bytes, then `second:` + bytes.
    Twice,
    /// `first:` + bytes, then `late:` + bytes after a delay.
    TwiceLate(Duration),
    /// `first:` + bytes; a datagram starting with `late` is owed `late:` + bytes too, sent
    /// just before the answer to the next datagram (from any client), so it is in flight
    /// while the next flow waits for its own reply.
    LateOnNext,
}

/// A UDP backend on 127.0.0.1:0.
struct UdpBackend {
    name: String,
    addr: SocketAddr,
    task: Option<JoinHandle<()>>,
}

impl UdpBackend {
    async fn start(name: &str, reply: Reply) -> UdpBackend {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("bind backend"));
        let addr = socket.local_addr().expect("addr");
        let prefix = format!("{name}:").into_bytes();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            let mut out = Vec::with_capacity(65536 + 16);
            let mut owed: Vec<(Vec<u8>, SocketAddr)> = Vec::new();
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                match reply {
                    Reply::Echo => {
                        let _ = socket.send_to(&buf[..n], from).await;
                    }
                    Reply::Named => {
                        out.clear();
                        out.extend_from_slice(&prefix);
                        out.extend_from_slice(&buf[..n]);
                        let _ = socket.send_to(&out, from).await;
                    }
                    Reply::Twice => {
                        for tag in [&b"first:"[..], b"second:"] {
                            out.clear();
                            out.extend_from_slice(tag);
                            out.extend_from_slice(&buf[..n]);
                            let _ = socket.send_to(&out, from).await;
                        }
                    }
                    Reply::TwiceLate(delay) => {
                        out.clear();
                        out.extend_from_slice(b"first:");
                        out.extend_from_slice(&buf[..n]);
                        let _ = socket.send_to(&out, from).await;
                        let late = [&b"late:"[..], &buf[..n]].concat();
                        let socket = Arc::clone(&socket);
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = socket.send_to(&late, from).await;
                        });
                    }
                    Reply::LateOnNext => {
                        for (late, to) in owed.drain(..) {
                            let _ = socket.send_to(&late, to).await;
                        }
                        let msg = &buf[..n];
                        let _ = socket.send_to(&[b"first:", msg].concat(), from).await;
                        if msg.starts_with(b"late") {
                            owed.push(([b"late:", msg].concat(), from));
                        }
                    }
                }
            }
        });
        UdpBackend {
            name: name.to_string(),
            addr,
            task: Some(task),
        }
    }

    /// Closes the socket: datagrams to the port now get ICMP port unreachable.
    async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn udp_config(listener_udp: &str, pool_extra: &str, backends: &[SocketAddr]) -> String {
    let listener = format!("    protocol: udp\n    udp:\n{listener_udp}");
    let list: Vec<(SocketAddr, u32)> = backends.iter().map(|a| (*a, 1)).collect();
    one_pool(pool_extra, &listener, &list)
}

/// A balancer on one backend whose flows end with their first reply (`responses: 1`, a
/// long idle timeout), with `listener_udp` added to the listener's `udp:` section.
async fn one_reply_balancer(backend: SocketAddr, listener_udp: &str) -> Balancer {
    let udp = format!("      idle_timeout: 30s\n      responses: 1\n{listener_udp}");
    Balancer::start(&udp_config(&udp, "", &[backend])).await
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.expect("bind client")
}

/// How long a client waits for a reply before sending again, as a UDP client does when a
/// datagram is lost. Long, so that a reply slowed down on a loaded machine is seldom asked
/// for twice (and when it is, [`exchange`] skips the second answer).
const RESEND: Duration = Duration::from_secs(3);

/// Sends `msg` to `to` until a datagram that `accept` takes arrives (resending every
/// [`RESEND`]) and returns it; the others (late answers to earlier sends) are skipped.
async fn send_until(
    socket: &UdpSocket,
    to: SocketAddr,
    msg: &[u8],
    mut accept: impl FnMut(&[u8]) -> bool,
) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    within("udp exchange", async {
        loop {
            socket.send_to(msg, to).await.expect("send");
            let resend = tokio::time::Instant::now() + RESEND;
            while let Ok(r) = tokio::time::timeout_at(resend, socket.recv(&mut buf)).await {
                let n = r.expect("recv");
                if accept(&buf[..n]) {
                    return buf[..n].to_vec();
                }
            }
        }
    })
    .await
}

/// Sends `msg` with a sequence number appended until the reply to it arrives, and returns
/// that reply without the number. The test backends answer with the datagram, perhaps after
/// a prefix, so a reply to this message ends with its number; a late reply to an earlier
/// message (a resend answered twice) does not, and is skipped.
async fn exchange(socket: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Vec<u8> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tag = format!("#{}", SEQ.fetch_add(1, Ordering::Relaxed));
    let tagged = [msg, tag.as_bytes()].concat();
    let mut reply = send_until(socket, to, &tagged, |r| r.ends_with(tag.as_bytes())).await;
    reply.truncate(reply.len() - tag.len());
    reply
}

/// Sends `msg` once and returns the first datagram that comes back: for tests where a
/// resend would change what is counted (a second request in a `responses` flow).
/// Loopback does not lose a lone datagram.
async fn query_once(socket: &UdpSocket, to: SocketAddr, msg: &[u8]) -> Vec<u8> {
    socket.send_to(msg, to).await.expect("send");
    let mut buf = vec![0u8; 65536];
    let n = within("udp reply", socket.recv(&mut buf))
        .await
        .expect("recv");
    buf.truncate(n);
    buf
}

/// Waits a moment for a datagram that should never come, and fails if one does. Bounded:
/// a datagram that was wrongly forwarded arrives within it, even on a loaded machine, and
/// a quiet socket passes whatever the load.
async fn expect_nothing_more(socket: &UdpSocket, what: &str) {
    let mut buf = [0u8; 256];
    if let Ok(got) = tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await {
        let n = got.expect("recv");
        panic!(
            "the client of {what} got {:?} after its reply",
            String::from_utf8_lossy(&buf[..n])
        );
    }
}

const FLOWS_ACTIVE: &str = "switchyard_udp_flows_active";
const FLOWS_CREATED: &str = "switchyard_udp_flows_created_total";
const FLOWS_EXPIRED: &str = "switchyard_udp_flows_expired_total";
const DROPPED: &str = "switchyard_udp_datagrams_dropped_total";
const SOCKETS_REUSED: &str = "switchyard_udp_upstream_sockets_reused_total";
const SOCKETS_SPARE: &str = "switchyard_udp_upstream_sockets_spare";

/// Deterministic bytes for client `c`, message `i`, of `len` bytes.
fn payload(c: usize, i: usize, len: usize) -> Vec<u8> {
    let mut state = (c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i as u64 + 1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_is_datagram_exact_for_many_concurrent_clients() {
    let backend = UdpBackend::start("echo", Reply::Echo).await;
    let lb = Balancer::start(&udp_config(
        "      idle_timeout: 30s\n",
        "",
        &[backend.addr],
    ))
    .await;
    let to = lb.addr("l");
    const SIZES: [usize; 11] = [0, 1, 8, 100, 512, 1472, 4096, 9000, 16384, 32768, 65507];
    const CLIENTS: usize = 24;
    const ROUNDS: usize = 2;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let socket = client().await;
            let mut bytes = 0u64;
            for i in 0..SIZES.len() * ROUNDS {
                let len = SIZES[(i + c) % SIZES.len()];
                let msg = payload(c, i, len);
                // Resent datagrams may echo twice: skip echoes of earlier messages.
                let got = send_until(&socket, to, &msg, |got| {
                    assert!(
                        got == msg
                            || (0..i).any(|j| payload(c, j, SIZES[(j + c) % SIZES.len()]) == got),
                        "client {c} message {i}: got {} bytes that were never sent",
                        got.len()
                    );
                    got == msg
                })
                .await;
                assert_eq!(got.len(), len);
                bytes += len as u64;
            }
            bytes
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("client");
    }
    wait_counter(&lb, "switchyard_udp_bytes_from_clients_total", &[], total).await;
    wait_counter(&lb, "switchyard_udp_bytes_to_clients_total", &[], total).await;
    assert_eq!(
        lb.counter(FLOWS_CREATED, &[]),
        CLIENTS as u64,
        "one flow per client"
    );
    assert_eq!(lb.counter(FLOWS_ACTIVE, &[]), CLIENTS as u64);
    assert_eq!(lb.counter(DROPPED, &[("reason", "truncated")]), 0);
}

#[tokio::test]
async fn idle_flows_expire_and_the_next_datagram_starts_a_new_one() {
    let backend = UdpBackend::start("echo", Reply::Echo).await;
    let lb = Balancer::start(&udp_config("      idle_timeout: 1s\n", "", &[backend.addr])).await;
    let socket = client().await;
    assert_eq!(exchange(&socket, lb.addr("l"), b"one").await, b"one");
    wait_counter(&lb, FLOWS_EXPIRED, &[("reason", "idle_timeout")], 1).await;
    wait_for("no flow left", || lb.counter(FLOWS_ACTIVE, &[]) == 0).await;
    let created = lb.counter(FLOWS_CREATED, &[]);
    assert_eq!(exchange(&socket, lb.addr("l"), b"two").await, b"two");
    assert_eq!(lb.counter(FLOWS_CREATED, &[]), created + 1, "a new flow");
    assert_eq!(lb.counter(FLOWS_ACTIVE, &[]), 1);
}

#[tokio::test]
async fn responses_one_ends_the_flow_after_the_first_reply() {
    let backend = UdpBackend::start("twice", Reply::Twice).await;
    let lb = one_reply_balancer(backend.addr, "").await;
    let socket = client().await;
    for i in 0..3 {
        let msg = format!("q{i}");
        let got = query_once(&socket, lb.addr("l"), msg.as_bytes()).await;
        assert_eq!(got, format!("first:{msg}").as_bytes());
        wait_counter(&lb, FLOWS_EXPIRED, &[("reason", "responses")], i + 1).await;
        // The flow ended as it forwarded the first reply: the second is not passed on.
        expect_nothing_more(&socket, &msg).await;
    }
    assert_eq!(lb.counter(FLOWS_CREATED, &[]), 3);
    assert_eq!(lb.counter(FLOWS_ACTIVE, &[]), 0);
}

#[tokio::test]
async fn short_flows_reuse_upstream_sockets_and_each_reply_matches_its_query() {
    let backend = UdpBackend::start("b", Reply::Named).await;
    let lb = one_reply_balancer(backend.addr, "").await;
    let to = lb.addr("l");
    // A new client socket per query, as a resolver with random source ports: one flow
    // each. Spares rest a moment before reuse, so this runs until many were reused.
    let mut queries = 0u64;
    within("upstream sockets reused", async {
        while queries < 300 || lb.counter(SOCKETS_REUSED, &[]) < 100 {
            assert!(
                queries < 20_000,
                "{queries} queries and too few reused sockets"
            );
            let socket = client().await;
            let msg = format!("query {queries}");
            // The first datagram back must be this query's reply (exchange would skip others).
            let got = query_once(&socket, to, msg.as_bytes()).await;
            assert_eq!(
                String::from_utf8_lossy(&got),
                format!("b:{msg}"),
                "a reply to another query"
            );
            queries += 1;
        }
    })
    .await;
    wait_counter(&lb, FLOWS_EXPIRED, &[("reason", "responses")], queries).await;
    let created = lb.counter(FLOWS_CREATED, &[]);
    assert!(created >= queries, "one flow per query");
    let reused = lb.counter(SOCKETS_REUSED, &[]);
    assert!(
        (100..created).contains(&reused),
        "{reused} of {created} flows on a spare: the first one cannot be"
    );
    assert_eq!(lb.counter(FLOWS_ACTIVE, &[]), 0);
}

#[tokio::test]
async fn a_late_reply_reaching_a_spare_socket_is_dropped() {
    let backend = UdpBackend::start("b", Reply::TwiceLate(Duration::from_millis(100))).await;
    let lb = one_reply_balancer(backend.addr, "").await;
    let to = lb.addr("l");
    let rest = Duration::from_millis(switchyard::udp::spare::REST_MS);
    const ROUNDS: u64 = 5;
    let mut clients = Vec::new();
    for i in 0..ROUNDS {
        // Each client's flow ends with its first reply; the backend's late second reply then
        // reaches the flow's socket while it is a spare (rested, but no flow took it yet: the
        // next one starts only once the drop is counted), and is dropped there.
        let socket = client().await;
        let msg = format!("q{i}");
        assert_eq!(
            String::from_utf8_lossy(&query_once(&socket, to, msg.as_bytes()).await),
            format!("first:{msg}"),
            "the first datagram back is this client's reply"
        );
        wait_counter(&lb, DROPPED, &[("reason", "extra_reply")], i + 1).await;
        clients.push((socket, msg));
        // Rested: the next client's flow may take this socket.
        tokio::time::sleep(2 * rest).await;
    }
    assert!(
        lb.counter(SOCKETS_REUSED, &[]) >= 1,
        "later flows took the sockets of earlier ones"
    );
    // Every late reply was dropped, none passed on: no client holds anything more.
    for (socket, msg) in &clients {
        expect_nothing_more(socket, msg).await;
    }
}

/// One flow that is owed a late reply, then, once its socket has rested, a second flow to
/// the same backend that waits for its own reply while the late one is sent (see
/// [`Reply::LateOnNext`]). Returns the first datagram the second client got, whether the
/// second flow took the first one's socket, and both clients.
async fn late_reply_in_flight(
    lb: &Balancer,
    round: u64,
) -> (String, bool, [(UdpSocket, String); 2]) {
    let to = lb.addr("l");
    let ended = [("reason", "responses")];
    let first = client().await;
    let asked = format!("late{round}");
    let got = query_once(&first, to, asked.as_bytes()).await;
    assert_eq!(String::from_utf8_lossy(&got), format!("first:{asked}"));
    wait_counter(lb, FLOWS_EXPIRED, &ended, 2 * round + 1).await;
    tokio::time::sleep(2 * Duration::from_millis(switchyard::udp::spare::REST_MS)).await;
    let reused = lb.counter(SOCKETS_REUSED, &[]);
    let second = client().await;
    let next = format!("next{round}");
    let got = query_once(&second, to, next.as_bytes()).await;
    // Counted when the flow started, before its reply came.
    let took = lb.counter(SOCKETS_REUSED, &[]) > reused;
    wait_counter(lb, FLOWS_EXPIRED, &ended, 2 * round + 2).await;
    (
        String::from_utf8_lossy(&got).into_owned(),
        took,
        [(first, asked), (second, next)],
    )
}

#[tokio::test]
async fn with_socket_reuse_a_late_reply_can_reach_the_next_flow_of_its_socket() {
    let backend = UdpBackend::start("b", Reply::LateOnNext).await;
    let lb = one_reply_balancer(backend.addr, "").await;
    // The trade-off reuse makes, and the reason for `reuse_upstream_sockets: false`: a late
    // reply that comes after the rest, once another flow holds the socket, is that flow's.
    // The second flow takes the first one's socket, unless a stall of a second let the spare
    // be closed meanwhile (it then opens one, or takes an older spare).
    for round in 0..10 {
        let (got, took, _) = late_reply_in_flight(&lb, round).await;
        if got == format!("late:late{round}") {
            assert!(took, "only through a reused socket");
            return;
        }
        assert_eq!(got, format!("first:next{round}"), "its own reply otherwise");
    }
    panic!("the second flow never took the first one's socket in 10 rounds");
}

#[tokio::test]
async fn without_socket_reuse_a_late_reply_never_reaches_a_later_client() {
    let backend = UdpBackend::start("b", Reply::LateOnNext).await;
    let lb = one_reply_balancer(backend.addr, "      reuse_upstream_sockets: false\n").await;
    let mut clients = Vec::new();
    for round in 0..5 {
        let (got, took, pair) = late_reply_in_flight(&lb, round).await;
        assert!(!took, "round {round}: a socket was reused");
        assert_eq!(got, format!("first:next{round}"), "its own reply, first");
        clients.extend(pair);
    }
    assert_eq!(lb.counter(SOCKETS_REUSED, &[]), 0);
    assert_eq!(lb.counter(SOCKETS_SPARE, &[]), 0, "no spare kept");
    assert_eq!(lb.counter(FLOWS_CREATED, &[]), 10, "a flow per query");
    // Each late reply was sent before the reply of the flow after it, to a socket closed
    // when its flow ended: no client got anything more.
    for (socket, msg) in &clients {
        expect_nothing_more(socket, msg).await;
    }
}

#[tokio::test]
async fn max_flows_drops_new_flows_and_counts_them() {
    let backend = UdpBackend::start("echo", Reply::Echo).await;
    let lb = Balancer::start(&udp_config(
        "      idle_timeout: 30s\n      max_flows: 2\n",
        "",
        &[backend.addr],
    ))
    .await;
    let (a, b, c) = (client().await, client().await, client().await);
    assert_eq!(exchange(&a, lb.addr("l"), b"a").await, b"a");
    assert_eq!(exchange(&b, lb.addr("l"), b"b").await, b"b");
    c.send_to(b"c", lb.addr("l")).await.expect("send");
    c.send_to(b"c", lb.addr("l")).await.expect("send");
    wait_counter(&lb, DROPPED, &[("reason", "max_flows")], 2).await;
    // Existing flows keep working.
    assert_eq!(exchange(&a, lb.addr("l"), b"a2").await, b"a2");
    assert_eq!(lb.counter(FLOWS_CREATED, &[]), 2);
}

/// Which backend answered, from a `name:` reply.
fn answered_by(reply: &[u8]) -> String {
    let text = String::from_utf8_lossy(reply);
    text.split(':').next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn backend_down_moves_the_flow_on_its_next_datagram() {
    let a = UdpBackend::start("a", Reply::Named).await;
    let b = UdpBackend::start("b", Reply::Named).await;
    let lb = Balancer::start(&udp_config(
        "      idle_timeout: 30s\n",
        "    balance: maglev\n    hash_key: client_ip_port\n",
        &[a.addr, b.addr],
    ))
    .await;
    let socket = client().await;
    let first = answered_by(&exchange(&socket, lb.addr("l"), b"1").await);
    let (down, other) = if first == "a" { (&a, &b) } else { (&b, &a) };
    assert_eq!(
        answered_by(&exchange(&socket, lb.addr("l"), b"2").await),
        first
    );
    lb.shared
        .backend_state("p", &down.addr.to_string())
        .expect("backend state")
        .set_health(Health::Down);
    assert_eq!(
        answered_by(&exchange(&socket, lb.addr("l"), b"3").await),
        other.name,
        "the next datagram goes to the other backend"
    );
    assert_eq!(lb.counter(FLOWS_EXPIRED, &[("reason", "backend_down")]), 1);
    // New clients go to the available backend at once.
    for _ in 0..5 {
        let fresh = client().await;
        assert_eq!(
            answered_by(&exchange(&fresh, lb.addr("l"), b"x").await),
            other.name
        );
    }
}

#[tokio::test]
async fn drain_and_weight_zero_keep_existing_flows_and_maint_moves_them() {
    let a = UdpBackend::start("a", Reply::Named).await;
    let b = UdpBackend::start("b", Reply::Named).await;
    let lb = Balancer::start(&udp_config(
        "      idle_timeout: 30s\n",
        "",
        &[a.addr, b.addr],
    ))
    .await;
    let to = lb.addr("l");
    let held = client().await;
    let first = answered_by(&exchange(&held, to, b"1").await);
    let (taken, other) = if first == "a" { (&a, &b) } else { (&b, &a) };
    let name = taken.addr.to_string();
    let kept_and_new_go_elsewhere = |what: &'static str| {
        let (held, first, other) = (&held, &first, &other.name);
        async move {
            for i in 0..3 {
                let msg = format!("{what}{i}");
                assert_eq!(
                    &answered_by(&exchange(held, to, msg.as_bytes()).await),
                    first,
                    "{what}: the existing flow stays on its backend"
                );
                let fresh = client().await;
                assert_eq!(
                    &answered_by(&exchange(&fresh, to, msg.as_bytes()).await),
                    other,
                    "{what}: a new client goes to the other backend"
                );
            }
        }
    };

    lb.control
        .set_weight("p", &name, Some(0))
        .await
        .expect("weight 0");
    kept_and_new_go_elsewhere("weight0-").await;
    lb.control
        .set_weight("p", &name, None)
        .await
        .expect("configured weight");
    lb.control
        .set_admin_state("p", &name, AdminState::Drain)
        .expect("drain");
    kept_and_new_go_elsewhere("drain-").await;
    assert_eq!(lb.counter(FLOWS_EXPIRED, &[("reason", "backend_down")]), 0);
    assert_eq!(
        lb.counter(FLOWS_CREATED, &[]),
        7,
        "the held flow and six new ones"
    );

    lb.control
        .set_admin_state("p", &name, AdminState::Maint)
        .expect("maint");
    assert_eq!(
        answered_by(&exchange(&held, to, b"maint").await),
        other.name,
        "maint moves the existing flow on its next datagram"
    );
    assert_eq!(lb.counter(FLOWS_EXPIRED, &[("reason", "backend_down")]), 1);
}

#[tokio::test]
async fn new_flows_use_the_fallback_pool_while_no_backend_is_available() {
    let main = UdpBackend::start("main", Reply::Named).await;
    let spare = UdpBackend::start("spare", Reply::Named).await;
    let lb = Balancer::start(&format!(
        "listeners:
  - {{ name: l, bind: 127.0.0.1:0, protocol: udp, pool: p }}
pools:
  - name: p
    fallback_pool: f
    backends: [{{ name: main, address: \"{}\" }}]
  - name: f
    backends: [{{ name: spare, address: \"{}\" }}]
",
        main.addr, spare.addr
    ))
    .await;
    let to = lb.addr("l");
    let held = client().await;
    assert_eq!(answered_by(&exchange(&held, to, b"1").await), "main");
    let fallback = [("pool", "p")];
    assert_eq!(lb.counter("switchyard_pool_fallback_total", &fallback), 0);

    let state = lb.shared.backend_state("p", "main").expect("main");
    state.set_health(Health::Down);
    // The held flow moves, to the fallback pool; so do new clients.
    assert_eq!(answered_by(&exchange(&held, to, b"2").await), "spare");
    let fresh = client().await;
    assert_eq!(answered_by(&exchange(&fresh, to, b"3").await), "spare");
    assert_eq!(lb.counter("switchyard_pool_fallback_total", &fallback), 2);
    assert_eq!(
        lb.counter(
            "switchyard_backend_connections_active",
            &[("pool", "f"), ("backend", "spare")]
        ),
        2,
        "both flows are counted on the fallback backend"
    );

    // Back up: new clients use the pool again.
    state.set_health(Health::Up);
    let later = client().await;
    assert_eq!(answered_by(&exchange(&later, to, b"4").await), "main");
    assert_eq!(lb.counter("switchyard_pool_fallback_total", &fallback), 2);
    // No backend in either pool: the datagram is dropped as no_backend.
    state.set_health(Health::Down);
    lb.shared
        .backend_state("f", "spare")
        .expect("spare")
        .set_health(Health::Down);
    client().await.send_to(b"nowhere", to).await.expect("send");
    wait_counter(&lb, DROPPED, &[("reason", "no_backend")], 1).await;
}

#[tokio::test]
async fn access_log_writes_one_record_per_flow_at_its_end() {
    let backend = UdpBackend::start("echo", Reply::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let yaml = format!(
        "access_log:\n  path: {}\n  format: json\n{}",
        log.display(),
        udp_config(
            "      idle_timeout: 30s\n      responses: 1\n",
            "",
            &[backend.addr]
        )
    );
    let mut lb = Balancer::start(&yaml).await;
    let socket = client().await;
    assert_eq!(query_once(&socket, lb.addr("l"), b"query").await, b"query");
    wait_counter(&lb, FLOWS_EXPIRED, &[("reason", "responses")], 1).await;
    lb.begin_shutdown();
    lb.finished().await;
    let text = std::fs::read_to_string(&log).expect("access log");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect();
    assert_eq!(records.len(), 1, "{text}");
    let r = &records[0];
    assert_eq!(r["listener"], "l");
    assert_eq!(r["client"], socket.local_addr().unwrap().to_string());
    assert_eq!(r["pool"], "p");
    // Unnamed, a backend is called by its address.
    assert_eq!(r["backend"], backend.addr.to_string());
    assert_eq!(r["backend_address"], backend.addr.to_string());
    assert_eq!(r["bytes_from_client"], 5);
    assert_eq!(r["bytes_to_client"], 5);
    assert_eq!(r["reason"], "responses");
    assert!(r["sni"].is_null());
    assert!(r["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{r}");
    assert!(r["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");
    assert_eq!(lb.counter("switchyard_access_log_records_total", &[]), 1);
}

#[tokio::test]
async fn icmp_port_unreachable_is_a_passive_failure_and_the_flow_moves() {
    let mut a = UdpBackend::start("a", Reply::Named).await;
    let mut b = UdpBackend::start("b", Reply::Named).await;
    let lb = Balancer::start(&udp_config(
        "      idle_timeout: 30s\n",
        "    balance: maglev\n    hash_key: client_ip_port\n    max_fails: 1\n    fail_duration: 1h\n",
        &[a.addr, b.addr],
    ))
    .await;
    let socket = client().await;
    let first = answered_by(&exchange(&socket, lb.addr("l"), b"1").await);
    let (stopped, other) = if first == "a" {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    let stopped_name = stopped.addr.to_string();
    stopped.stop().await;
    // The first datagram after the stop is refused (ICMP); the client resends and the
    // flow moves to the other backend.
    assert_eq!(
        answered_by(&exchange(&socket, lb.addr("l"), b"2").await),
        other.name
    );
    assert!(
        lb.counter(
            "switchyard_backend_udp_unreachable_total",
            &[("backend", &stopped_name)]
        ) >= 1
    );
    assert_eq!(
        lb.counter(
            "switchyard_backend_passive_down_total",
            &[("backend", &stopped_name)]
        ),
        1,
        "max_fails: 1 opens the breaker on the first unreachable"
    );
    assert_eq!(
        lb.counter(FLOWS_EXPIRED, &[("reason", "backend_refused")]),
        1
    );
    let state = lb.shared.backend_state("p", &stopped_name).expect("state");
    assert!(!state.is_available(switchyard::clock::now_ms()));
    // New flows avoid the refused backend while the breaker holds it down.
    for _ in 0..5 {
        let fresh = client().await;
        assert_eq!(
            answered_by(&exchange(&fresh, lb.addr("l"), b"x").await),
            other.name
        );
    }
}

#[tokio::test]
async fn maglev_client_ip_port_keeps_each_client_on_its_backend() {
    let backends = [
        UdpBackend::start("a", Reply::Named).await,
        UdpBackend::start("b", Reply::Named).await,
        UdpBackend::start("c", Reply::Named).await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    // responses: 1 ends every flow after its reply, so stickiness comes from the hash alone.
    let lb = Balancer::start(&udp_config(
        "      idle_timeout: 30s\n      responses: 1\n",
        "    balance: maglev\n    hash_key: client_ip_port\n",
        &addrs,
    ))
    .await;
    let mut used = HashSet::new();
    let mut per_client: HashMap<SocketAddr, String> = HashMap::new();
    for _ in 0..24 {
        let socket = client().await;
        let me = socket.local_addr().expect("addr");
        for i in 0..4 {
            let got =
                answered_by(&exchange(&socket, lb.addr("l"), format!("{i}").as_bytes()).await);
            let first = per_client.entry(me).or_insert_with(|| got.clone());
            assert_eq!(*first, got, "client {me} moved");
            used.insert(got);
        }
    }
    assert!(used.len() >= 2, "24 clients all hashed to {used:?}");
    wait_counter(&lb, FLOWS_EXPIRED, &[("reason", "responses")], 96).await;
}

#[tokio::test]
async fn shutdown_ends_open_flows_after_the_grace_period() {
    let backend = UdpBackend::start("echo", Reply::Echo).await;
    let yaml = format!(
        "global:\n  shutdown_grace: 100ms\n{}",
        udp_config("      idle_timeout: 1h\n", "", &[backend.addr])
    );
    let mut lb = Balancer::start(&yaml).await;
    let socket = client().await;
    assert_eq!(exchange(&socket, lb.addr("l"), b"hi").await, b"hi");
    lb.begin_shutdown();
    lb.finished().await;
    assert_eq!(lb.counter(FLOWS_EXPIRED, &[("reason", "shutdown")]), 1);
    assert_eq!(lb.counter(FLOWS_ACTIVE, &[]), 0);
}

#[tokio::test]
async fn tcp_and_udp_listeners_share_one_address() {
    let udp_backend = UdpBackend::start("u", Reply::Named).await;
    let tcp_backend = Backend::start("t").await;
    // A port free now may be taken by the time it is bound: try a few.
    let mut bound = None;
    for _ in 0..10 {
        let port = free_port();
        let yaml = format!(
            "listeners:
  - {{name: tcp, bind: 127.0.0.1:{port}, pool: tcp}}
  - {{name: udp, bind: 127.0.0.1:{port}, protocol: udp, pool: udp}}
pools:
  - {{name: tcp, backends: [{{address: \"{}\"}}]}}
  - {{name: udp, backends: [{{address: \"{}\"}}]}}
",
            tcp_backend.addr, udp_backend.addr
        );
        let config = switchyard::Config::from_yaml(&yaml, "test.yaml").expect("config");
        if let Ok(server) = switchyard::Server::bind(config) {
            bound = Some(server);
            break;
        }
    }
    let server = bound.expect("a port free for both tcp and udp");
    let (tcp, udp) = (
        server.local_addr("tcp").expect("tcp"),
        server.local_addr("udp").expect("udp"),
    );
    assert_eq!(tcp.port(), udp.port());
    let task = tokio::spawn(server.run(std::future::pending::<()>()));
    assert_eq!(backend_of(tcp).await, "t");
    let socket = client().await;
    assert_eq!(exchange(&socket, udp, b"x").await, b"u:x");
    task.abort();
}

/// A dnsmasq process answering `test.example` with 10.1.2.3, stopped by PID on drop.
struct Dnsmasq {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
        || std::path::Path::new(&format!("/usr/sbin/{program}")).exists()
}

fn dnsmasq_program() -> &'static str {
    if std::path::Path::new("/usr/sbin/dnsmasq").exists() {
        "/usr/sbin/dnsmasq"
    } else {
        "dnsmasq"
    }
}

/// A minimal DNS query for `name`, type A.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

async fn start_dnsmasq() -> Dnsmasq {
    // dnsmasq binds TCP too. Should the port be taken before dnsmasq binds it, dnsmasq
    // exits, and another port is tried.
    let mut last_error = String::new();
    for _ in 0..5 {
        let port = free_port();
        let child = Command::new(dnsmasq_program())
            .args([
                "--no-daemon",
                &format!("--port={port}"),
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--address=/test.example/10.1.2.3",
                "--conf-file=/dev/null",
                "--pid-file=",
                "--user=root",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dnsmasq");
        let mut server = Dnsmasq {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        // Ready once it answers a query directly.
        let socket = client().await;
        let mut buf = [0u8; 512];
        for _ in 0..50 {
            if let Ok(Some(status)) = server.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = server.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                last_error = format!("dnsmasq exited ({status}): {err}");
                break;
            }
            socket
                .send_to(&dns_query(7, "test.example"), server.addr)
                .await
                .expect("send");
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf)).await
            {
                assert!(n >= 2 && buf[..2] == 7u16.to_be_bytes(), "dnsmasq answered");
                return server;
            }
        }
    }
    panic!("dnsmasq did not start: {last_error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_dns_server_answers_dig_through_the_balancer() {
    if !have("dnsmasq") || !have("dig") {
        missing_tool(
            "real_dns_server_answers_dig_through_the_balancer",
            "dnsmasq and dig are needed (apt-get install dnsmasq-base bind9-dnsutils)",
        );
        return;
    }
    let dns = start_dnsmasq().await;
    let lb = Balancer::start(&udp_config(
        "      idle_timeout: 5s\n      responses: 1\n",
        "",
        &[dns.addr],
    ))
    .await;
    let port = lb.addr("l").port().to_string();
    let out = within(
        "dig",
        tokio::process::Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &port,
                "test.example",
                "A",
                "+short",
                "+tries=3",
                "+time=2",
            ])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run dig");
    assert!(out.status.success(), "dig failed: {out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10.1.2.3");
    // A name dnsmasq does not know: NXDOMAIN (REFUSED without upstreams) still comes back.
    let out = tokio::process::Command::new("dig")
        .args([
            "@127.0.0.1",
            "-p",
            &port,
            "other.example",
            "+tries=3",
            "+time=2",
        ])
        .kill_on_drop(true)
        .output()
        .await
        .expect("run dig");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("status: "),
        "dig got an answer: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    wait_counter(&lb, FLOWS_EXPIRED, &[("reason", "responses")], 2).await;
    wait_counter(&lb, "switchyard_udp_datagrams_to_clients_total", &[], 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_port_tasks_keep_each_client_on_one_flow() {
    let backend = UdpBackend::start("echo", Reply::Echo).await;
    let yaml = udp_config("      idle_timeout: 30s\n", "", &[backend.addr]).replace(
        "    protocol: udp\n",
        "    protocol: udp\n    reuse_port: true\n    accept_tasks: 2\n",
    );
    let lb = Balancer::start(&yaml).await;
    let to = lb.addr("l");
    let mut tasks = Vec::new();
    for c in 0..16 {
        tasks.push(tokio::spawn(async move {
            let socket = client().await;
            for i in 0..5 {
                let msg = payload(c, i, 100 + i);
                assert_eq!(exchange(&socket, to, &msg).await, msg);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    // Each client's datagrams all reached the same socket, so the same flow table.
    assert_eq!(lb.counter(FLOWS_CREATED, &[]), 16);
}
