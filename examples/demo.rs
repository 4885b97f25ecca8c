//! The demo: three local echo backends that answer with their own name, Switchyard in front
//! of them on an embedded config, a few client connections, one backend stopped to show
//! traffic moving to the others, then a pointer for trying it by hand.
//!
//!     cargo run --release --example demo            # keeps running until Ctrl-C
//!     cargo run --release --example demo -- --once  # exits after the scripted part
//!
//! It exits with an error when the scripted part does not show what it promises: every
//! backend answering, then traffic moving off the stopped one to the other two.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use switchyard::{Config, Server};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const CONFIG: &str = "
listeners:
  - name: demo
    bind: {BIND}
    pool: echo
pools:
  - name: echo
    balance: round_robin
    connect_timeout: 500ms
    retries: 2          # a refused connect is retried on another backend
    max_fails: 1        # ... and the refusing backend is skipped for fail_duration
    fail_duration: 30s
    backends:
      - { name: alpha,   address: {ALPHA} }
      - { name: bravo,   address: {BRAVO} }
      - { name: charlie, address: {CHARLIE} }
";

/// A line echo server that prefixes every reply with its name.
async fn echo_backend(name: &'static str) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut lines = BufReader::new(r).lines();
                let _ = w.write_all(format!("hello from {name}\n").as_bytes()).await;
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("{name}: {line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    Ok((addr, task))
}

/// One client connection: says something, prints who answered, returns the backend's name.
async fn client(addr: SocketAddr, n: usize) -> anyhow::Result<String> {
    let exchange = async {
        let stream = TcpStream::connect(addr)
            .await
            .context("connect to the balancer")?;
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        lines.next_line().await?;
        w.write_all(format!("message {n}\n").as_bytes()).await?;
        anyhow::Ok(lines.next_line().await?.unwrap_or_default())
    };
    let reply = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .with_context(|| format!("client {n}: no reply within 10s"))??;
    println!("  client {n:>2} -> {reply}");
    match reply.split_once(": ") {
        Some((name, _)) => Ok(name.to_string()),
        None => bail!("client {n}: unexpected reply {reply:?}"),
    }
}

/// The backends that answered clients `range`.
async fn clients(
    addr: SocketAddr,
    range: std::ops::RangeInclusive<usize>,
) -> anyhow::Result<BTreeSet<String>> {
    let mut answered = BTreeSet::new();
    for n in range {
        answered.insert(client(addr, n).await?);
    }
    Ok(answered)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    switchyard::log::init(switchyard::log::LogFormat::Text, "warn");
    let once = std::env::args().any(|a| a == "--once");

    let (alpha, _a) = echo_backend("alpha").await?;
    let (bravo, bravo_task) = echo_backend("bravo").await?;
    let (charlie, _c) = echo_backend("charlie").await?;
    // Port 7000 when free, to try by hand; any free port for the scripted run alone.
    let port_7000_free = !once && std::net::TcpListener::bind("127.0.0.1:7000").is_ok();
    let bind = if port_7000_free {
        "127.0.0.1:7000"
    } else {
        "127.0.0.1:0"
    };
    let yaml = CONFIG
        .replace("{BIND}", bind)
        .replace("{ALPHA}", &alpha.to_string())
        .replace("{BRAVO}", &bravo.to_string())
        .replace("{CHARLIE}", &charlie.to_string());
    let config = Config::from_yaml(&yaml, "<embedded demo config>")?;
    let server = Server::bind(config)?;
    let addr = server.local_addr("demo").context("demo listener")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));

    println!("Switchyard is listening on {addr}, round robin over alpha ({alpha}), bravo ({bravo}), charlie ({charlie}).\n");
    println!("Six connections:");
    let before = clients(addr, 1..=6).await?;
    if before.len() != 3 {
        bail!("round robin over three backends reached only {before:?}");
    }
    println!("\nStopping bravo (its port now refuses connections).");
    bravo_task.abort();
    // The aborted task has dropped bravo's listening socket once it has finished.
    let _ = bravo_task.await;
    println!("Six more connections: the refused connect is retried on another backend, invisibly,");
    println!("and bravo is then skipped for fail_duration:");
    let after = clients(addr, 7..=12).await?;
    if after.contains("bravo") || after.len() != 2 {
        bail!("traffic did not move from bravo to alpha and charlie: {after:?}");
    }
    println!("Failover: bravo's traffic moved to {after:?}.");

    if once {
        let _ = stop_tx.send(());
        running.await??;
        return Ok(());
    }
    println!(
        "\nTry it by hand:  nc {} {}   (type a line; the backend answers with its name)",
        addr.ip(),
        addr.port()
    );
    println!("Ctrl-C to stop.");
    tokio::signal::ctrl_c().await?;
    let _ = stop_tx.send(());
    running.await??;
    Ok(())
}
