//! One pool's view over its probers: each prober reports its backend's decided state (and,
//! for a Postgres primary, its timeline); the arbiter applies the pool-wide rule (the
//! split-brain guard of `role: primary` pools), then publishes every backend's final state
//! to its [`BackendState`], logging and counting each change once and, with
//! `on_backend_down: close_connections`, closing the open connections of a backend that
//! stopped being eligible.

use std::sync::{Arc, Mutex};

use prometheus::IntCounter;
use tracing::{error, warn};

use crate::backend::{BackendState, DownReason, Health, HealthStatus};
use crate::config::health::OnMultiplePrimaries;
use crate::conn::CloseReason;
use crate::metrics::HealthMetrics;

/// A backend as the arbiter sees it.
#[derive(Debug)]
pub struct Slot {
    pub name: Arc<str>,
    pub state: Arc<BackendState>,
    pub metrics: HealthMetrics,
    /// What this backend's own checks decided (rise/fall applied).
    decided: HealthStatus,
    /// Timeline of a backend that reports itself primary (Postgres).
    timeline: Option<u64>,
    /// The last failure's detail, for the state-change log line.
    detail: Option<String>,
}

impl Slot {
    pub fn new(name: Arc<str>, state: Arc<BackendState>, metrics: HealthMetrics) -> Slot {
        let decided = state.active_status();
        Slot {
            name,
            state,
            metrics,
            decided,
            timeline: None,
            detail: None,
        }
    }
}

#[derive(Debug)]
pub struct PoolArbiter {
    pool: Arc<str>,
    /// Set for Postgres `role: primary` pools: what to do with several primaries.
    split_brain: Option<OnMultiplePrimaries>,
    close_on_down: bool,
    split_brain_counter: IntCounter,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    slots: Vec<Slot>,
    /// Whether several primaries are being refused right now (logged on each change).
    split: bool,
}

impl PoolArbiter {
    pub fn new(
        pool: Arc<str>,
        split_brain: Option<OnMultiplePrimaries>,
        close_on_down: bool,
        split_brain_counter: IntCounter,
        slots: Vec<Slot>,
    ) -> PoolArbiter {
        PoolArbiter {
            pool,
            split_brain,
            close_on_down,
            split_brain_counter,
            inner: Mutex::new(Inner {
                slots,
                split: false,
            }),
        }
    }

    /// Takes over what `previous` (the arbiter of the probers this one replaces, after a
    /// reload) knew of the backends named in `same`: their own decided state and primary
    /// timeline, and whether a split brain was being refused. Without it, the first
    /// backend to report after a restart would be judged alone: an old primary refused
    /// for split brain would take writes until the newer primary reported again.
    /// Call before any prober reports.
    pub fn carry_over(&self, previous: &PoolArbiter, same: &[&str]) {
        if self.split_brain.is_none() || previous.split_brain.is_none() {
            return;
        }
        let old = previous.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for slot in &mut inner.slots {
            if !same.contains(&&*slot.name) {
                continue;
            }
            if let Some(before) = old.slots.iter().find(|o| o.name == slot.name) {
                slot.decided = before.decided;
                slot.timeline = before.timeline;
                slot.detail.clone_from(&before.detail);
            }
        }
        inner.split = old.split;
    }

    /// Records backend `index`'s decided state and republishes the pool.
    pub fn report(
        &self,
        index: usize,
        decided: HealthStatus,
        timeline: Option<u64>,
        detail: Option<String>,
    ) {
        // A poisoned lock means a panic mid-update; the slots are still valid values.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slot) = inner.slots.get_mut(index) else {
            return;
        };
        slot.decided = decided;
        slot.timeline = if decided.health == Health::Up {
            timeline
        } else {
            None
        };
        if detail.is_some() || decided.health != Health::Down {
            slot.detail = detail;
        }
        let finals = self.resolve(&mut inner);
        for (slot, status) in inner.slots.iter().zip(finals) {
            self.publish(slot, status);
        }
    }

    /// Final states: the decided ones, with the split-brain guard applied.
    fn resolve(&self, inner: &mut Inner) -> Vec<HealthStatus> {
        let mut finals: Vec<HealthStatus> = inner.slots.iter().map(|s| s.decided).collect();
        let Some(policy) = self.split_brain else {
            return finals;
        };
        let primaries: Vec<(usize, u64)> = inner
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.timeline.map(|t| (i, t)))
            .collect();
        // At startup no primary is trusted before every backend has answered once: the
        // first to answer would otherwise take writes for a moment even if another, newer
        // primary is about to report.
        let pending = HealthStatus::down(DownReason::Pending);
        let first_round = inner.slots.iter().any(|s| s.decided == pending)
            && !inner
                .slots
                .iter()
                .any(|s| s.state.active_status().health == Health::Up);
        if first_round {
            for (i, _) in &primaries {
                finals[*i] = pending;
            }
            return finals;
        }
        let split = primaries.len() > 1;
        if split {
            let newest = primaries.iter().map(|(_, t)| *t).max().unwrap_or(0);
            let at_newest = primaries.iter().filter(|(_, t)| *t == newest).count();
            let winner = match policy {
                OnMultiplePrimaries::NewestTimeline if at_newest == 1 => primaries
                    .iter()
                    .find(|(_, t)| *t == newest)
                    .map(|(i, _)| *i),
                _ => None,
            };
            for (i, _) in &primaries {
                if Some(*i) != winner {
                    finals[*i] = HealthStatus::down(DownReason::SplitBrain);
                }
            }
            let listing: Vec<String> = primaries
                .iter()
                .map(|(i, t)| format!("{} (timeline {t})", inner.slots[*i].name))
                .collect();
            if !inner.split {
                self.split_brain_counter.inc();
                let chosen = winner.map(|i| inner.slots[i].name.to_string());
                error!(
                    pool = %self.pool,
                    primaries = %listing.join(", "),
                    policy = ?policy,
                    routed_to = chosen.as_deref().unwrap_or("none"),
                    "SPLIT BRAIN: more than one backend reports itself primary"
                );
            }
        } else if inner.split {
            warn!(pool = %self.pool, "split brain over: at most one primary remains");
        }
        inner.split = split;
        finals
    }

    fn publish(&self, slot: &Slot, status: HealthStatus) {
        let before = slot.state.active_status();
        if before == status {
            return;
        }
        // Logged and counted as readers see it: an open passive breaker shows an up
        // backend as down (passive).
        let shown = slot.state.status();
        slot.state.set_status(status);
        let now_shown = slot.state.status();
        if shown != now_shown {
            slot.metrics.state_changed(now_shown);
            let detail = slot.detail.as_deref().unwrap_or("");
            super::log_change(&self.pool, &slot.name, shown, now_shown, detail);
        }
        if self.close_on_down && before.health == Health::Up && status.health != Health::Up {
            let open = slot.state.active();
            slot.state.close_connections(CloseReason::BackendDown);
            if open > 0 {
                warn!(pool = %self.pool, backend = %slot.name, open_connections = open, "closing open connections (on_backend_down: close_connections)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn arbiter(policy: Option<OnMultiplePrimaries>, n: usize) -> (PoolArbiter, Metrics) {
        let metrics = Metrics::new();
        let slots = (0..n)
            .map(|i| {
                let name = format!("b{i}");
                Slot::new(
                    Arc::from(name.as_str()),
                    Arc::new(BackendState::with_status(HealthStatus::down(
                        DownReason::Pending,
                    ))),
                    metrics.health("p", &name, "postgres"),
                )
            })
            .collect();
        let a = PoolArbiter::new(
            Arc::from("p"),
            policy,
            true,
            metrics.split_brain("p"),
            slots,
        );
        (a, metrics)
    }

    fn statuses(a: &PoolArbiter) -> Vec<HealthStatus> {
        let inner = a.inner.lock().expect("lock");
        inner
            .slots
            .iter()
            .map(|s| s.state.active_status())
            .collect()
    }

    const UP: HealthStatus = HealthStatus::UP;
    fn sb() -> HealthStatus {
        HealthStatus::down(DownReason::SplitBrain)
    }

    #[test]
    fn restarted_arbiter_keeps_refusing_the_old_primary() {
        let (a, _m) = arbiter(Some(OnMultiplePrimaries::NewestTimeline), 2);
        a.report(0, UP, Some(1), None);
        a.report(1, UP, Some(2), None);
        assert_eq!(statuses(&a), vec![sb(), UP]);

        // A reload restarts the probers over the same states: b0 (the old primary, on the
        // older timeline) happens to report first.
        let metrics = Metrics::new();
        let inner = a.inner.lock().expect("lock");
        let slots = inner
            .slots
            .iter()
            .map(|s| {
                Slot::new(
                    Arc::clone(&s.name),
                    Arc::clone(&s.state),
                    metrics.health("p", &s.name, "postgres"),
                )
            })
            .collect();
        drop(inner);
        let restarted = PoolArbiter::new(
            Arc::from("p"),
            Some(OnMultiplePrimaries::NewestTimeline),
            true,
            metrics.split_brain("p"),
            slots,
        );
        restarted.carry_over(&a, &["b0", "b1"]);
        restarted.report(0, UP, Some(1), None);
        assert_eq!(
            statuses(&restarted),
            vec![sb(), UP],
            "the old primary never comes back while the newer one is known"
        );
        assert_eq!(
            metrics.split_brain("p").get(),
            0,
            "the ongoing split brain is not counted again"
        );
    }

    #[test]
    fn newest_timeline_wins_and_ties_refuse_all() {
        let (a, _m) = arbiter(Some(OnMultiplePrimaries::NewestTimeline), 3);
        a.report(2, HealthStatus::down(DownReason::Unreachable), None, None);
        a.report(0, UP, Some(1), None);
        a.report(1, HealthStatus::STANDBY, None, None);
        assert_eq!(statuses(&a)[0], UP);
        // The replica is promoted while the old primary still runs.
        a.report(1, UP, Some(2), None);
        assert_eq!(statuses(&a)[..2], [sb(), UP]);
        assert_eq!(a.split_brain_counter.get(), 1);
        // A third, independent primary on the same timeline as the winner: a tie.
        a.report(2, UP, Some(2), None);
        assert_eq!(statuses(&a), vec![sb(), sb(), sb()]);
        // The old primary goes away; the tie remains.
        a.report(0, HealthStatus::down(DownReason::Unreachable), None, None);
        assert_eq!(statuses(&a)[1..], [sb(), sb()]);
        a.report(2, HealthStatus::down(DownReason::Unreachable), None, None);
        assert_eq!(statuses(&a)[1], UP, "one primary left");
        assert_eq!(a.split_brain_counter.get(), 1, "one episode, counted once");
    }

    #[test]
    fn no_primary_before_every_backend_answered_once() {
        let (a, _m) = arbiter(Some(OnMultiplePrimaries::NewestTimeline), 2);
        a.report(0, UP, Some(1), None);
        assert_eq!(
            statuses(&a)[0],
            HealthStatus::down(DownReason::Pending),
            "backend 1 has not answered yet"
        );
        a.report(1, UP, Some(1), None);
        assert_eq!(
            statuses(&a),
            vec![sb(), sb()],
            "a tie, never a moment of one winner"
        );
    }

    #[test]
    fn reject_refuses_every_primary_until_one_remains() {
        let (a, _m) = arbiter(Some(OnMultiplePrimaries::Reject), 2);
        a.report(0, UP, Some(1), None);
        a.report(1, UP, Some(2), None);
        assert_eq!(statuses(&a), vec![sb(), sb()]);
        a.report(0, HealthStatus::STANDBY, None, None);
        assert_eq!(statuses(&a), vec![HealthStatus::STANDBY, UP]);
    }

    #[test]
    fn changes_are_logged_and_counted_as_readers_see_them() {
        let logs = crate::log::capture();
        let (a, m) = arbiter(None, 1);
        a.report(0, UP, None, None);
        let state = {
            let inner = a.inner.lock().expect("lock");
            Arc::clone(&inner.slots[0].state)
        };
        // The passive breaker holds the up backend out; the checks then fail and recover.
        let breaker = crate::backend::Breaker {
            max_fails: 1,
            fail_duration_ms: 3_600_000,
        };
        assert!(state
            .record_connect_failure(crate::clock::now_ms(), breaker)
            .is_some());
        a.report(0, HealthStatus::down(DownReason::Unreachable), None, None);
        a.report(0, UP, None, None);
        let seen: Vec<(String, String)> = logs
            .events("backend state changed")
            .iter()
            .map(|e| (e["from"].to_string(), e["to"].to_string()))
            .collect();
        let pair = |f: &str, t: &str| (format!("{f:?}"), format!("{t:?}"));
        assert_eq!(
            seen,
            vec![
                pair("down (pending)", "up"),
                pair("down (passive)", "down (unreachable)"),
                pair("down (unreachable)", "down (passive)"),
            ]
        );
        assert_eq!(m.backend("p", "b0").passive_down.get(), 1);
        assert_eq!(m.backend("p", "b0").back_up.get(), 1, "pending to up");
    }

    #[tokio::test]
    async fn leaving_up_closes_connections() {
        let (a, _m) = arbiter(None, 1);
        a.report(0, UP, None, None);
        let state = {
            let inner = a.inner.lock().expect("lock");
            Arc::clone(&inner.slots[0].state)
        };
        let mut rx = state.close_signal();
        a.report(0, HealthStatus::STANDBY, None, None);
        let reason = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv()).await;
        assert_eq!(
            reason.expect("close order"),
            crate::conn::CloseReason::BackendDown
        );
    }
}
