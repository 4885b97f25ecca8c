//! `GET /metrics`: the registry's families (counters and histograms the data path bumps
//! through pre-resolved handles), plus families read at scrape time from live state: each
//! backend's active connections, weight, `up` and `state`, and process metrics from /proc.
//! A scrape loads the snapshot (`ArcSwap`) and reads atomics; it never locks the data path.

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{Counter, Encoder, IntGauge, IntGaugeVec, Opts, TextEncoder};

use super::status::{self, BACKEND_STATES};
use crate::backend::DownReason;
use crate::clock;
use crate::metrics::names;
use crate::state::{Shared, Snapshot};

/// The full exposition in Prometheus text format.
pub fn render(shared: &Shared) -> String {
    let mut families = shared.metrics.registry.gather();
    families.extend(backend_families(&shared.snapshot()));
    families.extend(process_families());
    families.retain(|f| !f.get_metric().is_empty());
    families.sort_by(|a, b| a.get_name().cmp(b.get_name()));
    let mut out = Vec::with_capacity(16 * 1024);
    // Encoding into memory cannot fail for I/O reasons; every family here has samples.
    let _ = TextEncoder::new().encode(&families, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> Option<IntGaugeVec> {
    IntGaugeVec::new(Opts::new(name, help), labels).ok()
}

/// Live per-backend families. A backend appears once per pool in the current config.
pub fn backend_families(snapshot: &Snapshot) -> Vec<MetricFamily> {
    let (Some(active), Some(weight), Some(up), Some(state), Some(down_reason)) = (
        gauge_vec(
            names::BACKEND_CONNECTIONS_ACTIVE,
            "Connections open to a backend.",
            &["pool", "backend"],
        ),
        gauge_vec(
            names::BACKEND_WEIGHT,
            "Weight in effect (an admin override, or the config's).",
            &["pool", "backend"],
        ),
        gauge_vec(
            names::BACKEND_UP,
            "1 when checking finds the backend healthy (passive breaker closed, checks passing), else 0.",
            &["pool", "backend"],
        ),
        gauge_vec(
            names::BACKEND_STATE,
            "1 for the backend's current state (up, down, standby, drain, maint), 0 for the others.",
            &["pool", "backend", "state"],
        ),
        gauge_vec(
            names::BACKEND_DOWN_REASON,
            "1 for the reason a down backend is down, 0 for the other reasons (all 0 when not down).",
            &["pool", "backend", "reason"],
        ),
    ) else {
        return Vec::new();
    };
    let now_ms = clock::now_ms();
    for pool in snapshot.pools.values() {
        let p = pool.config.name.as_str();
        for b in &pool.backends {
            let l = [p, &*b.name];
            active
                .with_label_values(&l)
                .set(i64::try_from(b.state.active()).unwrap_or(i64::MAX));
            weight.with_label_values(&l).set(i64::from(b.weight));
            let (health, _) = status::health(b, now_ms);
            up.with_label_values(&l).set(i64::from(health == "up"));
            let reason = b.state.status().reason;
            for r in DownReason::ALL {
                down_reason
                    .with_label_values(&[p, &*b.name, r.as_str()])
                    .set(i64::from(reason == Some(r)));
            }
            let current = status::overall(b, health);
            for s in BACKEND_STATES {
                state
                    .with_label_values(&[p, &*b.name, s])
                    .set(i64::from(s == current));
            }
        }
    }
    [
        active.collect(),
        weight.collect(),
        up.collect(),
        state.collect(),
        down_reason.collect(),
    ]
    .concat()
}

/// CPU, memory and file descriptors of this process, from /proc (Linux).
pub fn process_families() -> Vec<MetricFamily> {
    let mut out = Vec::new();
    let Some(stat) = ProcStat::read() else {
        return out;
    };
    if let Ok(c) = Counter::new(
        names::PROCESS_CPU,
        "User and system CPU time spent, in seconds.",
    ) {
        c.inc_by(stat.cpu_seconds);
        out.extend(c.collect());
    }
    let gauges = [
        (
            names::PROCESS_RSS,
            "Resident memory size in bytes.",
            Some(stat.rss_bytes),
        ),
        (
            names::PROCESS_VSZ,
            "Virtual memory size in bytes.",
            Some(stat.vsize_bytes),
        ),
        (
            names::PROCESS_START_TIME,
            "Start time of the process since the Unix epoch, in seconds.",
            stat.start_time_seconds,
        ),
        (
            names::PROCESS_OPEN_FDS,
            "Open file descriptors.",
            std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as i64),
        ),
        (
            names::PROCESS_MAX_FDS,
            "The open-file limit (soft).",
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .ok()
                .map(|(soft, _)| i64::try_from(soft).unwrap_or(i64::MAX)),
        ),
    ];
    for (name, help, value) in gauges {
        if let (Some(v), Ok(g)) = (value, IntGauge::new(name, help)) {
            g.set(v);
            out.extend(g.collect());
        }
    }
    out
}

struct ProcStat {
    cpu_seconds: f64,
    rss_bytes: i64,
    vsize_bytes: i64,
    start_time_seconds: Option<i64>,
}

impl ProcStat {
    fn read() -> Option<ProcStat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) may hold spaces; fields after its closing paren are plain.
        let rest = &text[text.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // `rest` starts at field 3 (state); field N is f[N - 3].
        let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|t| *t > 0)
            .unwrap_or(100) as f64;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as i64;
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        Some(ProcStat {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            vsize_bytes: field(23)? as i64,
            rss_bytes: field(24)? as i64 * page,
            start_time_seconds: boot_time
                .zip(field(22))
                .map(|(boot, start)| (boot as f64 + start as f64 / ticks) as i64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_are_read_from_proc() {
        let families = process_families();
        let names: Vec<&str> = families.iter().map(|f| f.get_name()).collect();
        for n in [
            names::PROCESS_CPU,
            names::PROCESS_RSS,
            names::PROCESS_OPEN_FDS,
            names::PROCESS_MAX_FDS,
            names::PROCESS_START_TIME,
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        let rss = families
            .iter()
            .find(|f| f.get_name() == names::PROCESS_RSS)
            .map(|f| f.get_metric()[0].get_gauge().get_value())
            .unwrap_or(0.0);
        assert!(rss > 1_000_000.0, "rss {rss}");
    }
}
