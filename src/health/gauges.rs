//! Backend state gauges computed at scrape time from the live [`BackendState`]s, so the
//! passive breaker's expiry and every check's decision show without anyone updating a gauge:
//! `switchyard_backend_state{pool,backend,state}` (1 for the current of up/down/standby) and
//! `switchyard_backend_down_reason{pool,backend,reason}` (1 for the current reason).
//! The list of backends is replaced whenever a snapshot is built.

use std::sync::{Arc, Mutex};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntGaugeVec, Opts};

use crate::backend::{BackendState, DownReason, Health};
use crate::metrics::names;

type Entry = (String, String, Arc<BackendState>);

/// A prometheus collector over the current config's backends.
#[derive(Debug, Clone)]
pub struct StateGauges {
    backends: Arc<Mutex<Vec<Entry>>>,
    state: IntGaugeVec,
    reason: IntGaugeVec,
}

impl Default for StateGauges {
    fn default() -> Self {
        Self::new()
    }
}

impl StateGauges {
    /// Panics only on a malformed metric name (fixed at compile time).
    pub fn new() -> StateGauges {
        let state = IntGaugeVec::new(
            Opts::new(
                names::BACKEND_STATE,
                "Backend state: 1 for the current one of up, down, standby.",
            ),
            &["pool", "backend", "state"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        let reason = IntGaugeVec::new(
            Opts::new(
                names::BACKEND_DOWN_REASON,
                "Why a backend is down: 1 for the current reason, all 0 when it is not down.",
            ),
            &["pool", "backend", "reason"],
        )
        .unwrap_or_else(|e| panic!("metric: {e}"));
        StateGauges {
            backends: Arc::new(Mutex::new(Vec::new())),
            state,
            reason,
        }
    }

    /// Replaces the backends reported (called when a snapshot is built).
    pub fn set_backends(&self, backends: Vec<Entry>) {
        *self.backends.lock().unwrap_or_else(|e| e.into_inner()) = backends;
    }
}

impl Collector for StateGauges {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.state.desc();
        d.extend(self.reason.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let backends = self.backends.lock().unwrap_or_else(|e| e.into_inner());
        self.state.reset();
        self.reason.reset();
        for (pool, backend, state) in backends.iter() {
            let status = state.status();
            for h in Health::ALL {
                self.state
                    .with_label_values(&[pool, backend, h.as_str()])
                    .set(i64::from(status.health == h));
            }
            for r in DownReason::ALL {
                self.reason
                    .with_label_values(&[pool, backend, r.as_str()])
                    .set(i64::from(status.reason == Some(r)));
            }
        }
        let mut out = self.state.collect();
        out.extend(self.reason.collect());
        out
    }
}
