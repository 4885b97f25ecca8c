//! The access log: one record per connection at its end (time, listener, client, pool,
//! backend, SNI and offered ALPN when known, bytes each way, duration, close reason and, when
//! the routing step refused the connection, why), as JSON or logfmt text.
//! Connections hand records to a bounded channel with `try_send`; a writer thread formats
//! and writes them. When the writer falls behind, records are dropped and counted: logging
//! never blocks forwarding. A reload reconfigures (and reopens, for log rotation) the file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::backend::{BackendAddr, ClientAddr};
use crate::config::{AccessLogConfig, AccessLogFormat, AccessLogTarget};
use crate::metrics::OpsMetrics;
use crate::route::Refusal;

/// Records waiting for the writer; beyond this they are dropped.
pub const QUEUE: usize = 16 * 1024;

/// One finished connection.
#[derive(Debug, Clone)]
pub struct Record {
    pub time: SystemTime,
    pub listener: Arc<str>,
    pub client: ClientAddr,
    pub pool: Arc<str>,
    /// Name and address of the backend the connection was forwarded to, if any.
    pub backend: Option<(Arc<str>, BackendAddr)>,
    /// TLS server name, when the listener reads it.
    pub sni: Option<Box<str>>,
    /// ALPN protocols the TLS client offered, comma-separated, when it offered any.
    pub alpn: Option<Box<str>>,
    pub bytes_from_client: u64,
    pub bytes_to_client: u64,
    pub duration: Duration,
    /// Why it ended: a TCP close reason (`CloseReason::as_str`) or a UDP flow end
    /// (`FlowEnd::as_str`).
    pub reason: &'static str,
    /// Why the routing step refused it (reason `refused`): ACL, PROXY header, ClientHello.
    pub refused: Option<Refusal>,
}

enum Msg {
    Record(Record),
    Configure(Option<AccessLogConfig>),
    Stop,
}

/// The connections' side of the access log: cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::Sender<Msg>,
    enabled: Arc<AtomicBool>,
    dropped: IntCounter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("enabled", &self.enabled.load(Ordering::Relaxed))
            .finish()
    }
}

/// The writer's side: run it on its own thread with [`Writer::run`].
pub struct Writer {
    rx: mpsc::Receiver<Msg>,
    enabled: Arc<AtomicBool>,
    records: IntCounter,
    errors: IntCounter,
    out: Option<(BufWriter<Box<dyn Write + Send>>, AccessLogFormat)>,
}

impl AccessLog {
    /// A log with room for `capacity` queued records, and its writer (not yet running).
    pub fn new(capacity: usize, metrics: &OpsMetrics) -> (AccessLog, Writer) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let enabled = Arc::new(AtomicBool::new(false));
        (
            AccessLog {
                tx,
                enabled: Arc::clone(&enabled),
                dropped: metrics.access_log_dropped.clone(),
            },
            Writer {
                rx,
                enabled,
                records: metrics.access_log_records.clone(),
                errors: metrics.access_log_write_errors.clone(),
                out: None,
            },
        )
    }

    /// Starts the writer thread configured with `config`.
    pub fn start(
        config: Option<&AccessLogConfig>,
        metrics: &OpsMetrics,
    ) -> io::Result<(AccessLog, std::thread::JoinHandle<()>)> {
        let (log, mut writer) = AccessLog::new(QUEUE, metrics);
        writer.configure(config.cloned());
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run())?;
        Ok((log, thread))
    }

    /// Queues the record `make` builds, unless the log is off; drops and counts it when the
    /// queue is full. Never waits.
    pub fn log(&self, make: impl FnOnce() -> Record) {
        if !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        if self.tx.try_send(Msg::Record(make())).is_err() {
            self.dropped.inc();
        }
    }

    /// Applies a new `access_log` section (reload): reopens the file, so rotated logs are
    /// let go, or turns logging off.
    pub async fn configure(&self, config: Option<AccessLogConfig>) {
        let _ = self.tx.send(Msg::Configure(config)).await;
    }

    /// Writes what is queued, then stops the writer.
    pub async fn stop(&self) {
        let _ = self.tx.send(Msg::Stop).await;
    }
}

impl Writer {
    /// Runs until [`AccessLog::stop`] or until every sender is gone.
    pub fn run(mut self) {
        while let Some(msg) = self.rx.blocking_recv() {
            match msg {
                Msg::Record(r) => self.write(&r),
                Msg::Configure(c) => self.configure(c),
                Msg::Stop => break,
            }
            if self.rx.is_empty() {
                self.flush();
            }
        }
        self.flush();
    }

    fn configure(&mut self, config: Option<AccessLogConfig>) {
        self.flush();
        self.out = None;
        let Some(config) = config else {
            self.enabled.store(false, Ordering::Relaxed);
            return;
        };
        let sink: io::Result<Box<dyn Write + Send>> = match &config.target {
            AccessLogTarget::Stdout => Ok(Box::new(io::stdout())),
            AccessLogTarget::File(path) => OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(|f: File| Box::new(f) as Box<dyn Write + Send>),
        };
        match sink {
            Ok(sink) => {
                info!(target = ?config.target, format = ?config.format, "access log open");
                self.out = Some((BufWriter::with_capacity(64 * 1024, sink), config.format));
                self.enabled.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors.inc();
                warn!(target = ?config.target, error = %e, "cannot open the access log; access logging is off");
                self.enabled.store(false, Ordering::Relaxed);
            }
        }
    }

    fn write(&mut self, r: &Record) {
        let Some((out, format)) = &mut self.out else {
            return;
        };
        let result = match format {
            AccessLogFormat::Json => serde_json::to_writer(&mut *out, &JsonRecord::from(r))
                .map_err(io::Error::from)
                .and_then(|()| out.write_all(b"\n")),
            AccessLogFormat::Text => out.write_all(text_line(r).as_bytes()),
        };
        match result {
            Ok(()) => self.records.inc(),
            Err(_) => self.errors.inc(),
        }
    }

    fn flush(&mut self) {
        if let Some((out, _)) = &mut self.out {
            if out.flush().is_err() {
                self.errors.inc();
            }
        }
    }
}

#[derive(Serialize)]
struct JsonRecord<'a> {
    time: String,
    listener: &'a str,
    client: String,
    pool: &'a str,
    backend: Option<&'a str>,
    backend_address: Option<String>,
    sni: Option<&'a str>,
    alpn: Option<&'a str>,
    bytes_from_client: u64,
    bytes_to_client: u64,
    duration_ms: f64,
    reason: &'static str,
    refused: Option<&'static str>,
}

impl<'a> From<&'a Record> for JsonRecord<'a> {
    fn from(r: &'a Record) -> Self {
        JsonRecord {
            time: humantime::format_rfc3339_millis(r.time).to_string(),
            listener: &r.listener,
            client: r.client.to_string(),
            pool: &r.pool,
            backend: r.backend.as_ref().map(|(n, _)| &**n),
            backend_address: r.backend.as_ref().map(|(_, a)| a.to_string()),
            sni: r.sni.as_deref(),
            alpn: r.alpn.as_deref(),
            bytes_from_client: r.bytes_from_client,
            bytes_to_client: r.bytes_to_client,
            duration_ms: (r.duration.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            reason: r.reason,
            refused: r.refused.map(Refusal::as_str),
        }
    }
}

/// logfmt: `key=value` pairs; values with spaces or quotes are quoted.
fn text_line(r: &Record) -> String {
    let (backend, address) = match &r.backend {
        Some((name, addr)) => (quote(name), addr.to_string()),
        None => ("-".to_string(), "-".to_string()),
    };
    format!(
        "time={} listener={} client={} pool={} backend={} backend_address={} sni={} alpn={} bytes_from_client={} bytes_to_client={} duration_ms={:.3} reason={} refused={}\n",
        humantime::format_rfc3339_millis(r.time),
        quote(&r.listener),
        r.client,
        quote(&r.pool),
        backend,
        address,
        r.sni.as_deref().map_or("-".to_string(), quote),
        r.alpn.as_deref().map_or("-".to_string(), quote),
        r.bytes_from_client,
        r.bytes_to_client,
        r.duration.as_secs_f64() * 1000.0,
        r.reason,
        r.refused.map_or("-", Refusal::as_str),
    )
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\')
    {
        s.to_string()
    } else {
        format!("{s:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::CloseReason;
    use crate::metrics::Metrics;

    fn record(n: u64) -> Record {
        Record {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            listener: Arc::from("app"),
            client: ClientAddr("10.1.2.3:51234".parse().expect("addr")),
            pool: Arc::from("app pool"),
            backend: Some((
                Arc::from("db-1"),
                BackendAddr("10.0.0.7:5432".parse().expect("addr")),
            )),
            sni: None,
            alpn: None,
            bytes_from_client: n,
            bytes_to_client: 90211,
            duration: Duration::from_millis(5312),
            reason: CloseReason::ClientClosed.as_str(),
            refused: None,
        }
    }

    #[test]
    fn full_queue_drops_and_counts_without_blocking() {
        let metrics = Metrics::new();
        let (log, mut writer) = AccessLog::new(2, &metrics.ops);
        log.enabled.store(true, Ordering::Relaxed);
        for n in 0..5 {
            log.log(|| record(n));
        }
        assert_eq!(metrics.ops.access_log_dropped.get(), 3);
        // The two queued records are still there for the writer.
        let mut queued = 0;
        while let Ok(Msg::Record(_)) = writer.rx.try_recv() {
            queued += 1;
        }
        assert_eq!(queued, 2);
    }

    #[test]
    fn disabled_log_builds_nothing() {
        let metrics = Metrics::new();
        let (log, _writer) = AccessLog::new(2, &metrics.ops);
        log.log(|| panic!("a disabled log must not build records"));
        assert_eq!(metrics.ops.access_log_dropped.get(), 0);
    }

    #[test]
    fn json_and_text_lines() {
        let r = record(1840);
        let json: serde_json::Value =
            serde_json::to_value(JsonRecord::from(&r)).expect("serialize");
        assert_eq!(json["time"], "2023-11-14T22:13:20.000Z");
        assert_eq!(json["listener"], "app");
        assert_eq!(json["client"], "10.1.2.3:51234");
        assert_eq!(json["backend"], "db-1");
        assert_eq!(json["backend_address"], "10.0.0.7:5432");
        assert_eq!(json["sni"], serde_json::Value::Null);
        assert_eq!(json["alpn"], serde_json::Value::Null);
        assert_eq!(json["bytes_from_client"], 1840);
        assert_eq!(json["duration_ms"], 5312.0);
        assert_eq!(json["reason"], "client_closed");
        assert_eq!(
            text_line(&r),
            "time=2023-11-14T22:13:20.000Z listener=app client=10.1.2.3:51234 pool=\"app pool\" backend=db-1 backend_address=10.0.0.7:5432 sni=- alpn=- bytes_from_client=1840 bytes_to_client=90211 duration_ms=5312.000 reason=client_closed refused=-\n"
        );
        let refused = Record {
            backend: None,
            sni: Some(Box::from("other.example.com")),
            alpn: Some(Box::from("h2,http/1.1")),
            reason: CloseReason::Refused.as_str(),
            refused: Some(Refusal::NoRoute),
            ..r
        };
        let json = serde_json::to_value(JsonRecord::from(&refused)).expect("serialize");
        assert_eq!(json["sni"], "other.example.com");
        assert_eq!(json["alpn"], "h2,http/1.1");
        assert_eq!(json["reason"], "refused");
        assert_eq!(json["refused"], "no_route");
        let line = text_line(&refused);
        assert!(
            line.contains(" sni=other.example.com alpn=h2,http/1.1 "),
            "{line}"
        );
        assert!(line.ends_with(" reason=refused refused=no_route\n"));
    }

    #[test]
    fn writer_writes_a_file_and_reopens_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        let metrics = Metrics::new();
        let config = AccessLogConfig {
            target: AccessLogTarget::File(path.clone()),
            format: AccessLogFormat::Json,
        };
        let (log, thread) = AccessLog::start(Some(&config), &metrics.ops).expect("start");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        log.log(|| record(1));
        // Rotate: move the file away, reconfigure, log again.
        let rotated = dir.path().join("access.log.1");
        std::fs::rename(&path, &rotated).expect("rotate");
        rt.block_on(log.configure(Some(config.clone())));
        log.log(|| record(2));
        rt.block_on(log.stop());
        thread.join().expect("writer thread");
        let first = std::fs::read_to_string(&rotated).expect("rotated");
        let second = std::fs::read_to_string(&path).expect("reopened");
        assert_eq!(first.lines().count(), 1, "{first}");
        assert_eq!(second.lines().count(), 1, "{second}");
        assert!(second.contains("\"bytes_from_client\":2"), "{second}");
        assert_eq!(metrics.ops.access_log_records.get(), 2);
    }
}
