//! The passive breaker's state changes. Consecutive connect failures on the data path open
//! a backend's breaker (`BackendState::record_connect_failure`), which shows an up backend
//! as down (passive) until `fail_duration` has passed; the breaker then closes by the clock
//! alone, with no connection there to notice. [`record_failure`] is what the data path
//! calls (a TCP connect that failed, a UDP port unreachable); [`opened`] announces the
//! opening (logged once, counted) and starts a task that announces the closing when it
//! comes, so both changes show in the log and in `switchyard_backend_state_changes_total`.
//!
//! The breaker only overlays an up backend: while the active checks hold a backend down or
//! standby, its breaker opening or closing changes nothing a reader sees, and neither is
//! logged or counted as a state change (the arbiter's changes are, as readers see them).

use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;

use super::log_change;
use crate::backend::{
    Backend, BackendState, Breaker, BreakerClose, DownReason, Health, HealthStatus, Opening,
};
use crate::clock;
use crate::metrics::BackendMetrics;
use crate::state::Pool;

/// Counts a failure of backend `index` of `pool` on the data path toward its breaker and,
/// when that opens it, announces the opening; `why` (the failures that opened it) is built
/// only then.
pub fn record_failure(pool: &Pool, index: usize, now_ms: u64, why: impl FnOnce() -> String) {
    let backend = &pool.backends[index];
    if let Some(opening) = backend.state.record_connect_failure(now_ms, pool.breaker) {
        opened(
            &pool.config.name,
            backend,
            &pool.backend_metrics[index],
            opening,
            pool.breaker,
            &why(),
        );
    }
}

/// Announces a breaker that just opened on `backend` of `pool` (`why`: the failures that
/// opened it) and, inside a runtime, starts the task that announces its closing.
pub fn opened(
    pool: &str,
    backend: &Backend,
    metrics: &BackendMetrics,
    opening: Opening,
    breaker: Breaker,
    why: &str,
) {
    metrics.breaker_opened.inc();
    let state = &backend.state;
    if opening.previous_close_unclaimed {
        // The previous opening ran out before its task (if any) saw it.
        announce_close(pool, &backend.name, state, &metrics.back_up);
    }
    let held_for = humantime::format_duration(Duration::from_millis(breaker.fail_duration_ms));
    if state.active_status().health == Health::Up {
        metrics.passive_down.inc();
        let detail = format!("passive breaker opened: {why}; held out for {held_for}");
        log_change(
            pool,
            &backend.name,
            HealthStatus::UP,
            HealthStatus::down(DownReason::Passive),
            &detail,
        );
    } else {
        tracing::debug!(pool, backend = %backend.name, why, "passive breaker opened on a backend the active check already holds out");
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(announce_when_closed(
            Arc::from(pool),
            Arc::clone(&backend.name),
            Arc::clone(state),
            metrics.back_up.clone(),
        ));
    }
}

/// Waits until the breaker of `state` has closed, then announces it, unless another task
/// or a later opening claimed that close first.
pub async fn announce_when_closed(
    pool: Arc<str>,
    backend: Arc<str>,
    state: Arc<BackendState>,
    back_up: IntCounter,
) {
    loop {
        let now = clock::now_ms();
        match state.claim_breaker_close(now) {
            BreakerClose::OpenUntil(until) => {
                tokio::time::sleep(Duration::from_millis(until.saturating_sub(now))).await;
            }
            BreakerClose::Closed => return announce_close(&pool, &backend, &state, &back_up),
            BreakerClose::Nothing => return,
        }
    }
}

/// Logs and counts a closed breaker, when that brought the backend back up.
fn announce_close(pool: &str, backend: &str, state: &BackendState, back_up: &IntCounter) {
    if state.active_status() != HealthStatus::UP {
        return;
    }
    back_up.inc();
    log_change(
        pool,
        backend,
        HealthStatus::down(DownReason::Passive),
        HealthStatus::UP,
        "passive breaker closed: fail_duration has passed",
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::capture;
    use crate::metrics::Metrics;

    const BREAKER: Breaker = Breaker {
        max_fails: 1,
        fail_duration_ms: 50,
    };

    fn open(backend: &Backend, metrics: &BackendMetrics) {
        let opening = backend
            .state
            .record_connect_failure(clock::now_ms(), BREAKER)
            .expect("max_fails 1: the first failure opens");
        opened(
            "p",
            backend,
            metrics,
            opening,
            BREAKER,
            "1 consecutive connect failure",
        );
    }

    #[tokio::test]
    async fn opening_and_closing_are_each_logged_once_and_counted() {
        let logs = capture();
        let metrics = Metrics::new();
        let m = metrics.backend("p", "b");
        let backend = Backend::new("b", "127.0.0.1:1".parse().expect("addr"), 1);
        open(&backend, &m);
        assert_eq!(
            backend.state.status(),
            HealthStatus::down(DownReason::Passive)
        );
        assert_eq!((m.breaker_opened.get(), m.passive_down.get()), (1, 1));
        tokio::time::timeout(Duration::from_secs(10), async {
            while m.back_up.get() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the close is announced");
        assert_eq!(backend.state.status(), HealthStatus::UP);
        // Give a second announcement every chance to show up.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(m.back_up.get(), 1);
        let changes = logs.events("backend state changed");
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(
            (&changes[0]["from"], &changes[0]["to"]),
            (&"up".into(), &"down (passive)".into())
        );
        assert_eq!(
            (&changes[1]["from"], &changes[1]["to"]),
            (&"down (passive)".into(), &"up".into())
        );
        assert_eq!(changes[1]["level"], "INFO");
    }

    #[tokio::test]
    async fn a_close_nobody_saw_is_announced_by_the_next_opening() {
        let metrics = Metrics::new();
        let m = metrics.backend("p", "b");
        let backend = Backend::new("b", "127.0.0.1:1".parse().expect("addr"), 1);
        let now = clock::now_ms();
        // Opened with no task to watch it (as outside a runtime), then run out.
        backend.state.record_connect_failure(now, BREAKER);
        let opening = backend
            .state
            .record_connect_failure(now + 100, BREAKER)
            .expect("opens again");
        assert!(opening.previous_close_unclaimed);
        opened("p", &backend, &m, opening, BREAKER, "again");
        assert_eq!(m.back_up.get(), 1, "the unseen close");
        assert_eq!(m.passive_down.get(), 1, "the new opening");
    }

    #[tokio::test]
    async fn nothing_is_counted_while_the_active_check_holds_the_backend_out() {
        let metrics = Metrics::new();
        let m = metrics.backend("p", "b");
        let backend = Backend::new("b", "127.0.0.1:1".parse().expect("addr"), 1);
        backend
            .state
            .set_status(HealthStatus::down(DownReason::Unreachable));
        open(&backend, &m);
        assert_eq!((m.breaker_opened.get(), m.passive_down.get()), (1, 0));
        announce_when_closed(
            Arc::from("p"),
            Arc::clone(&backend.name),
            Arc::clone(&backend.state),
            m.back_up.clone(),
        )
        .await;
        assert_eq!(m.back_up.get(), 0);
    }
}
