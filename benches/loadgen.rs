//! Load generator and echo backend for `benches/compare.sh`: the client and server ends of
//! the proxy comparison, driven by arguments. Every mode is bounded in time and count, talks
//! to loopback addresses only, and prints one `key=value` result line on stdout for the
//! script to read. A bare `cargo bench` runs this target with `--bench` and no mode: it then
//! prints usage and exits 0.
//!
//! Modes:
//! - `serve`: echo backend (writes back whatever it reads; closes when the client does).
//! - `rr`: kept-alive connections, each sending a small request and waiting for the reply.
//! - `connect`: a new connection per request (connect, send, read the reply, close).
//! - `idle`: open many connections, one round trip each, then hold them until told to stop.
//! - `free-port`: print a 127.0.0.1 port outside the ephemeral range that is free now.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
#[command(
    name = "loadgen",
    about = "Echo backend and load generator for benches/compare.sh (loopback only)",
    after_help = "Run through cargo: cargo bench --bench loadgen -- MODE [OPTIONS]"
)]
struct Cli {
    /// Runtime threads (1: a single-threaded runtime).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Echo backend: prints `listening port=PORT`, then serves until SIGTERM/SIGINT or
    /// --max-seconds.
    Serve {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1800)]
        max_seconds: u64,
    },
    /// Request/response over kept-alive connections; reports requests/s and p50/p99.
    Rr {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 16)]
        conns: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Upper bound on requests per connection.
        #[arg(long, default_value_t = 10_000_000)]
        max_requests: u64,
    },
    /// A new connection per request; reports connections/s and p50/p99.
    Connect {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Upper bound on connections per loop.
        #[arg(long, default_value_t = 1_000_000)]
        max_connections: u64,
    },
    /// Opens --conns connections (one round trip each), prints `ready ...`, then holds them
    /// until SIGTERM/SIGINT, stdin closing (with --stdin) or --hold-seconds.
    Idle {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 5000)]
        conns: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 64)]
        parallel: usize,
        /// Give up opening after this long.
        #[arg(long, default_value_t = 60)]
        open_seconds: u64,
        #[arg(long, default_value_t = 300)]
        hold_seconds: u64,
        /// Also stop when stdin reaches EOF.
        #[arg(long)]
        stdin: bool,
    },
    /// Prints a port on 127.0.0.1, below the ephemeral range, that can be bound right now.
    FreePort,
}

fn main() -> ExitCode {
    // `cargo bench` passes --bench to every bench target; it means nothing here.
    let args = std::env::args_os().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    let Some(mode) = cli.mode else {
        use clap::CommandFactory;
        let _ = Cli::command().print_help();
        println!();
        return ExitCode::SUCCESS;
    };
    if let Mode::FreePort = mode {
        return match free_port() {
            Some(port) => {
                println!("{port}");
                ExitCode::SUCCESS
            }
            None => {
                eprintln!("loadgen: no free port found on 127.0.0.1");
                ExitCode::FAILURE
            }
        };
    }
    let target = match &mode {
        Mode::Rr { to, .. } | Mode::Connect { to, .. } | Mode::Idle { to, .. } => Some(*to),
        Mode::Serve { listen, .. } => Some(*listen),
        Mode::FreePort => None,
    };
    if let Some(addr) = target {
        if !addr.ip().is_loopback() {
            eprintln!("loadgen: {addr} is not a loopback address; refusing");
            return ExitCode::from(2);
        }
    }
    raise_fd_limit();
    let runtime = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match mode {
            Mode::Serve {
                listen,
                max_seconds,
            } => serve(listen, Duration::from_secs(max_seconds)).await,
            Mode::Rr {
                to,
                conns,
                size,
                seconds,
                max_requests,
            } => rr(to, conns, size, secs(seconds), max_requests).await,
            Mode::Connect {
                to,
                concurrency,
                size,
                seconds,
                max_connections,
            } => connect(to, concurrency, size, secs(seconds), max_connections).await,
            Mode::Idle {
                to,
                conns,
                size,
                parallel,
                open_seconds,
                hold_seconds,
                stdin,
            } => {
                idle(
                    to,
                    conns,
                    size,
                    parallel,
                    Duration::from_secs(open_seconds),
                    Duration::from_secs(hold_seconds),
                    stdin,
                )
                .await
            }
            Mode::FreePort => Ok(()),
        }
    });
    // Held connections close with the runtime; do not wait for blocked stdin readers.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.1, 3600.0))
}

fn free_port() -> Option<u16> {
    // Below the default ephemeral range (32768-60999), so outgoing connections of the
    // benchmark itself cannot take it between this check and the proxy's bind.
    let start = 20000 + (std::process::id() % 10000) as u16;
    (0..2000u16)
        .map(|i| 20000 + (start - 20000 + i * 7) % 12000)
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
}

fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Completes on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn serve(listen: SocketAddr, max: Duration) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    say(&format!("listening port={}", listener.local_addr()?.port()));
    let accept = async {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(echo(stream));
                }
                // EMFILE and the like: wait instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    };
    tokio::select! {
        () = accept => {}
        () = stop_signal() => {}
        () = tokio::time::sleep(max) => {}
    }
    Ok(())
}

/// Writes back everything it reads; closes after the client's FIN (or an error).
async fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stream.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Latency samples in nanoseconds, bounded per task.
struct Samples {
    ns: Vec<u64>,
    count: u64,
}

const MAX_SAMPLES_PER_TASK: usize = 1 << 20;

impl Samples {
    fn new() -> Samples {
        Samples {
            ns: Vec::with_capacity(4096),
            count: 0,
        }
    }

    fn record(&mut self, d: Duration) {
        self.count += 1;
        if self.ns.len() < MAX_SAMPLES_PER_TASK {
            self.ns.push(d.as_nanos() as u64);
        }
    }
}

/// `p` in 0..=100 of sorted nanosecond samples, as microseconds.
fn percentile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0
}

fn summarize(mode: &str, unit: &str, all: Vec<Samples>, errors: u64, elapsed: Duration) {
    let count: u64 = all.iter().map(|s| s.count).sum();
    let mut ns: Vec<u64> = all.into_iter().flat_map(|s| s.ns).collect();
    ns.sort_unstable();
    let rate = count as f64 / elapsed.as_secs_f64();
    say(&format!(
        "{mode} {unit}={count} errors={errors} seconds={:.3} rate={rate:.0} p50_us={:.1} p99_us={:.1}",
        elapsed.as_secs_f64(),
        percentile_us(&ns, 50.0),
        percentile_us(&ns, 99.0),
    ));
}

async fn rr(
    to: SocketAddr,
    conns: usize,
    size: usize,
    duration: Duration,
    max_requests: u64,
) -> anyhow::Result<()> {
    let size = size.clamp(1, 65536);
    let conns = conns.clamp(1, 10_000);
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(to)).await??;
        s.set_nodelay(true)?;
        streams.push(s);
    }
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let request = vec![b'r'; size];
                let mut reply = vec![0u8; size];
                let mut samples = Samples::new();
                let mut errors = 0u64;
                while samples.count < max_requests && Instant::now() < deadline {
                    let t0 = Instant::now();
                    let round = async {
                        s.write_all(&request).await?;
                        s.read_exact(&mut reply).await
                    };
                    match tokio::time::timeout(Duration::from_secs(5), round).await {
                        Ok(Ok(_)) => samples.record(t0.elapsed()),
                        _ => {
                            errors += 1;
                            break;
                        }
                    }
                }
                (samples, errors)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    for t in tasks {
        let (samples, e) = t.await?;
        all.push(samples);
        errors += e;
    }
    summarize("rr", "requests", all, errors, started.elapsed());
    Ok(())
}

async fn connect(
    to: SocketAddr,
    concurrency: usize,
    size: usize,
    duration: Duration,
    max_connections: u64,
) -> anyhow::Result<()> {
    let size = size.clamp(1, 65536);
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..concurrency.clamp(1, 1000))
        .map(|_| {
            tokio::spawn(async move {
                let request = vec![b'c'; size];
                let mut reply = vec![0u8; size];
                let mut samples = Samples::new();
                let mut errors = 0u64;
                let mut attempts = 0u64;
                while attempts < max_connections && Instant::now() < deadline {
                    attempts += 1;
                    let t0 = Instant::now();
                    let round = async {
                        let mut s = TcpStream::connect(to).await?;
                        s.set_nodelay(true)?;
                        s.write_all(&request).await?;
                        s.read_exact(&mut reply).await?;
                        Ok::<_, std::io::Error>(())
                    };
                    match tokio::time::timeout(Duration::from_secs(5), round).await {
                        Ok(Ok(())) => samples.record(t0.elapsed()),
                        _ => {
                            errors += 1;
                            // Out of ports or descriptors: back off rather than spin.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                }
                (samples, errors)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    for t in tasks {
        let (samples, e) = t.await?;
        all.push(samples);
        errors += e;
    }
    summarize("connect", "connections", all, errors, started.elapsed());
    Ok(())
}

async fn idle(
    to: SocketAddr,
    conns: usize,
    size: usize,
    parallel: usize,
    open_for: Duration,
    hold_for: Duration,
    watch_stdin: bool,
) -> anyhow::Result<()> {
    let size = size.clamp(1, 65536);
    let conns = conns.clamp(1, 100_000);
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(parallel.clamp(1, 1024)));
    let opening: Vec<_> = (0..conns)
        .map(|_| {
            let limit = Arc::clone(&limit);
            tokio::spawn(async move {
                let _permit = limit.acquire_owned().await.ok()?;
                let round = async {
                    let mut s = TcpStream::connect(to).await?;
                    s.set_nodelay(true)?;
                    s.write_all(&vec![b'i'; size]).await?;
                    let mut reply = vec![0u8; size];
                    s.read_exact(&mut reply).await?;
                    Ok::<_, std::io::Error>(s)
                };
                tokio::time::timeout(Duration::from_secs(10), round)
                    .await
                    .ok()?
                    .ok()
            })
        })
        .collect();
    let mut held = Vec::with_capacity(conns);
    let open_deadline = tokio::time::Instant::now() + open_for;
    for task in opening {
        match tokio::time::timeout_at(open_deadline, task).await {
            Ok(Ok(Some(s))) => held.push(s),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    say(&format!(
        "ready opened={} failed={} seconds={:.3}",
        held.len(),
        conns - held.len(),
        started.elapsed().as_secs_f64()
    ));
    let stdin_closed = async {
        if watch_stdin {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 256];
            // Bounded by the hold timer below.
            while !matches!(stdin.read(&mut buf).await, Ok(0) | Err(_)) {}
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = stop_signal() => {}
        () = stdin_closed => {}
        () = tokio::time::sleep(hold_for) => {}
    }
    drop(held);
    say("released");
    Ok(())
}
