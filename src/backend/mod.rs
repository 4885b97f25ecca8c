//! Backend identity and live state. A [`Backend`] is immutable and belongs to one config
//! snapshot; its [`BackendState`] is shared atomics keyed by (pool, backend name) and carried
//! from snapshot to snapshot, so a reload resets neither health nor connection counts.
//! This module owns the passive circuit breaker and the health state every reader sees
//! ([`HealthStatus`] in `health`: up, standby, or down with a reason); active checks
//! (`crate::health`) decide it, and an open breaker overlays it as down (passive).

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::conn::CloseReason;

mod health;

pub use health::{DownReason, Health, HealthStatus, LastCheck};

/// Address of a backend server (what Switchyard connects to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendAddr(pub SocketAddr);

/// Address of the client as seen by the listener (or, later, as told by a PROXY header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Operator-set state (admin API): whether a backend takes new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminState {
    /// Takes new connections.
    Ready = 0,
    /// No new connections; existing ones continue.
    Drain = 1,
    /// No new connections; existing ones are closed.
    Maint = 2,
}

impl AdminState {
    /// The state stored as `code`; an unknown code is Ready.
    fn from_code(code: u8) -> AdminState {
        match code {
            1 => AdminState::Drain,
            2 => AdminState::Maint,
            _ => AdminState::Ready,
        }
    }
}

/// A backend's live state as a new process takes it over on a binary upgrade, so that it
/// starts from the running process's verdicts instead of down (pending) until its own checks
/// pass `rise` times: the checks' status, the operator's state and weight (what HAProxy's
/// server-state file carries across a reload). Stored codes, stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Carried {
    pub status: u8,
    pub admin: u8,
    pub weight: Option<u32>,
}

/// The passive circuit breaker's settings for one pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breaker {
    /// Consecutive connect failures that open the breaker (0 disables it).
    pub max_fails: u32,
    /// How long an open breaker keeps the backend out of rotation.
    pub fail_duration_ms: u64,
}

/// The passive breaker opened (see [`BackendState::record_connect_failure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opening {
    /// The opening before this one closed (its `fail_duration` ran out) and nobody claimed
    /// that close yet: the caller announces it along with this opening.
    pub previous_close_unclaimed: bool,
}

/// Where the passive breaker's closing stands for a caller that wants to announce it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerClose {
    /// Open until this `clock::now_ms` value.
    OpenUntil(u64),
    /// It closed, and this caller is the one to announce it.
    Closed,
    /// Not open, and no close left to announce.
    Nothing,
}

/// Live, shared state of one backend. All fields are atomics: readers never lock.
#[derive(Debug)]
pub struct BackendState {
    active: AtomicU64,
    consecutive_fails: AtomicU32,
    /// `clock::now_ms` value until which the passive breaker holds the backend down; 0: closed.
    down_until_ms: AtomicU64,
    admin: AtomicU8,
    health: AtomicU8,
    /// Weight set through the admin API; `NO_WEIGHT_OVERRIDE` when the config's applies.
    weight_override: AtomicU32,
    /// Orders open connections to this backend to close (see [`CloseSignal`]): an operator's
    /// maint, or `on_backend_down: close_connections`.
    close_tx: watch::Sender<Option<CloseReason>>,
    last_check_ms: AtomicU64,
    last_check_us: AtomicU64,
    last_check_result: AtomicU8,
    /// Set when a reload removed this backend from a `close_connections` pool: connections
    /// that picked it from an older snapshot close as they open.
    retired: AtomicBool,
}

const NO_WEIGHT_OVERRIDE: u32 = u32::MAX;

impl Default for BackendState {
    fn default() -> Self {
        Self::new()
    }
}

impl BackendState {
    pub fn new() -> Self {
        BackendState {
            active: AtomicU64::new(0),
            consecutive_fails: AtomicU32::new(0),
            down_until_ms: AtomicU64::new(0),
            admin: AtomicU8::new(AdminState::Ready as u8),
            health: AtomicU8::new(Health::Up as u8),
            weight_override: AtomicU32::new(NO_WEIGHT_OVERRIDE),
            close_tx: watch::Sender::new(None),
            last_check_ms: AtomicU64::new(0),
            last_check_us: AtomicU64::new(0),
            last_check_result: AtomicU8::new(0),
            retired: AtomicBool::new(false),
        }
    }

    /// The weight set through the admin API, which takes precedence over the config's.
    pub fn weight_override(&self) -> Option<u32> {
        let w = self.weight_override.load(Ordering::Relaxed);
        (w != NO_WEIGHT_OVERRIDE).then_some(w)
    }

    /// Sets (Some) or clears (None) the weight override; the caller rebuilds the pool.
    pub fn set_weight_override(&self, weight: Option<u32>) {
        self.weight_override
            .store(weight.unwrap_or(NO_WEIGHT_OVERRIDE), Ordering::Relaxed);
    }

    /// Tells every connection open to this backend *now* to close with `reason`.
    /// Connections opened later are not affected.
    pub fn close_connections(&self, reason: CloseReason) {
        self.close_tx.send_replace(Some(reason));
    }

    /// What an open connection listens on to learn that it must close. Subscribe right
    /// after connecting, then check [`BackendState::standing_close`] for an order given
    /// just before.
    pub fn close_signal(&self) -> CloseSignal {
        CloseSignal(self.close_tx.subscribe())
    }

    /// A close order that applies to connections as they open (the backend is in maint,
    /// or was removed from a `close_connections` pool).
    pub fn standing_close(&self) -> Option<CloseReason> {
        if self.retired.load(Ordering::SeqCst) {
            return Some(CloseReason::BackendDown);
        }
        (self.admin() == AdminState::Maint).then_some(CloseReason::Maint)
    }

    /// The backend left a `close_connections` pool for good (reload): closes its open
    /// connections, and those still opening from an older snapshot.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::SeqCst);
        self.close_connections(CloseReason::BackendDown);
    }

    /// State for a backend first seen with this health (a checked pool starts down, pending).
    pub fn with_status(status: HealthStatus) -> Self {
        let s = Self::new();
        s.set_status(status);
        s
    }

    /// What a new process takes over on a binary upgrade (see [`Carried`]).
    pub fn carried(&self) -> Carried {
        Carried {
            status: self.active_status().encode(),
            admin: self.admin() as u8,
            weight: self.weight_override(),
        }
    }

    /// State that starts where a previous process left off (binary upgrade).
    pub fn from_carried(carried: &Carried) -> Self {
        let s = Self::with_status(HealthStatus::decode(carried.status));
        s.set_admin(AdminState::from_code(carried.admin));
        s.set_weight_override(carried.weight);
        s
    }

    /// Whether new connections may go to this backend at `now_ms`.
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.admin.load(Ordering::Relaxed) == AdminState::Ready as u8
            && self.health.load(Ordering::Relaxed) == Health::Up as u8
            && self.down_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// Whether traffic already on this backend may stay on it at `now_ms`: drain (and a
    /// weight of 0) only keep new connections away, while maint, a health verdict other
    /// than up, and an open passive breaker take it out. UDP flows move when this is false.
    pub fn may_keep_traffic(&self, now_ms: u64) -> bool {
        self.admin.load(Ordering::Relaxed) != AdminState::Maint as u8
            && self.health.load(Ordering::Relaxed) == Health::Up as u8
            && self.down_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// Connections currently open to this backend.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a connection on this backend until the guard is dropped.
    pub fn connection_opened(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard {
            state: Arc::clone(self),
        }
    }

    pub fn admin(&self) -> AdminState {
        AdminState::from_code(self.admin.load(Ordering::Relaxed))
    }

    pub fn set_admin(&self, state: AdminState) {
        self.admin.store(state as u8, Ordering::Relaxed);
    }

    /// Health, active and passive combined: an open passive breaker shows as down (passive).
    pub fn health(&self) -> Health {
        self.status().health
    }

    /// Health with its reason, active and passive combined.
    pub fn status(&self) -> HealthStatus {
        let active = self.active_status();
        if active.health == Health::Up && self.passive_down_until(crate::clock::now_ms()).is_some()
        {
            return HealthStatus::down(DownReason::Passive);
        }
        active
    }

    /// What the active checks decided (or `set_health` set), without the passive breaker.
    pub fn active_status(&self) -> HealthStatus {
        HealthStatus::decode(self.health.load(Ordering::Relaxed))
    }

    pub fn set_health(&self, health: Health) {
        self.set_status(HealthStatus {
            health,
            reason: None,
        });
    }

    pub fn set_status(&self, status: HealthStatus) {
        self.health.store(status.encode(), Ordering::Relaxed);
    }

    /// Records one finished active check.
    pub fn record_check(&self, at_ms: u64, duration_us: u64, result: HealthStatus) {
        self.last_check_us.store(duration_us, Ordering::Relaxed);
        self.last_check_result
            .store(result.encode(), Ordering::Relaxed);
        self.last_check_ms.store(at_ms, Ordering::Relaxed);
    }

    /// The last active check, if one ran.
    pub fn last_check(&self) -> Option<LastCheck> {
        let at_ms = self.last_check_ms.load(Ordering::Relaxed);
        (at_ms != 0).then(|| LastCheck {
            at_ms,
            duration_us: self.last_check_us.load(Ordering::Relaxed),
            result: HealthStatus::decode(self.last_check_result.load(Ordering::Relaxed)),
        })
    }

    /// A connect succeeded: the consecutive-failure count starts again.
    pub fn record_connect_success(&self) {
        if self.consecutive_fails.load(Ordering::Relaxed) != 0 {
            self.consecutive_fails.store(0, Ordering::Relaxed);
        }
    }

    /// A connect failed. Returns the opening when this failure opened the breaker (the
    /// caller announces the state change once); the backend is then skipped until
    /// `fail_duration` has passed.
    pub fn record_connect_failure(&self, now_ms: u64, breaker: Breaker) -> Option<Opening> {
        if breaker.max_fails == 0 {
            return None;
        }
        let fails = self.consecutive_fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails < breaker.max_fails {
            return None;
        }
        self.consecutive_fails.store(0, Ordering::Relaxed);
        let until = now_ms + breaker.fail_duration_ms;
        let previous = self.down_until_ms.swap(until, Ordering::Relaxed);
        (previous <= now_ms).then_some(Opening {
            previous_close_unclaimed: previous != 0,
        })
    }

    /// Claims the passive breaker's closing, so that exactly one caller announces it: while
    /// the breaker is open, when it closes; once it has closed, [`BreakerClose::Closed`] for
    /// the first caller and [`BreakerClose::Nothing`] for any other (or when the opening that
    /// followed claimed it, see [`Opening::previous_close_unclaimed`]).
    pub fn claim_breaker_close(&self, now_ms: u64) -> BreakerClose {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        if until == 0 {
            return BreakerClose::Nothing;
        }
        if until > now_ms {
            return BreakerClose::OpenUntil(until);
        }
        match self
            .down_until_ms
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => BreakerClose::Closed,
            Err(_) => BreakerClose::Nothing,
        }
    }

    /// When the passive breaker is open at `now_ms`, the time it closes.
    pub fn passive_down_until(&self, now_ms: u64) -> Option<u64> {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        (until > now_ms).then_some(until)
    }
}

/// Receives close orders for one connection's backend.
#[derive(Debug)]
pub struct CloseSignal(watch::Receiver<Option<CloseReason>>);

impl CloseSignal {
    /// A signal that never fires (tests, or a connection without a backend state).
    pub fn never() -> CloseSignal {
        let (tx, rx) = watch::channel(None);
        // The receiver stays valid; `recv` then waits forever, as intended.
        drop(tx);
        CloseSignal(rx)
    }

    /// Completes with the reason of the next close order; never, if none comes.
    pub async fn recv(&mut self) -> CloseReason {
        loop {
            if self.0.changed().await.is_err() {
                return std::future::pending().await;
            }
            if let Some(reason) = *self.0.borrow_and_update() {
                return reason;
            }
        }
    }
}

/// Counts one open connection on a backend; decrements on drop.
#[derive(Debug)]
pub struct ActiveGuard {
    state: Arc<BackendState>,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One backend of one pool in one config snapshot.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Identity within the pool: the configured `name`, or the address as written.
    pub name: Arc<str>,
    pub addr: BackendAddr,
    /// Relative share of new connections; 0 takes none.
    pub weight: u32,
    pub state: Arc<BackendState>,
}

impl Backend {
    /// A backend with fresh state (tests, benches, and first-time config builds).
    pub fn new(name: &str, addr: SocketAddr, weight: u32) -> Self {
        Backend {
            name: Arc::from(name),
            addr: BackendAddr(addr),
            weight,
            state: Arc::new(BackendState::new()),
        }
    }

    /// Whether the balancer may choose this backend at `now_ms`.
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.weight > 0 && self.state.is_available(now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BREAKER: Breaker = Breaker {
        max_fails: 3,
        fail_duration_ms: 10_000,
    };

    #[test]
    fn carried_state_starts_a_new_process_where_the_old_one_was() {
        let old = BackendState::with_status(HealthStatus::down(DownReason::WrongRole));
        old.set_admin(AdminState::Maint);
        old.set_weight_override(Some(7));
        let new = BackendState::from_carried(&old.carried());
        assert_eq!(
            new.active_status(),
            HealthStatus::down(DownReason::WrongRole)
        );
        assert_eq!(new.admin(), AdminState::Maint);
        assert_eq!(new.weight_override(), Some(7));
        let standby =
            BackendState::from_carried(&BackendState::with_status(HealthStatus::STANDBY).carried());
        assert_eq!(standby.active_status(), HealthStatus::STANDBY);
        assert_eq!(standby.weight_override(), None);
    }

    #[test]
    fn breaker_opens_after_max_fails_and_closes_after_duration() {
        let s = BackendState::new();
        assert_eq!(s.record_connect_failure(100, BREAKER), None);
        assert_eq!(s.record_connect_failure(101, BREAKER), None);
        assert!(s.is_available(101));
        assert!(
            s.record_connect_failure(102, BREAKER).is_some(),
            "third failure opens"
        );
        assert!(!s.is_available(103));
        assert_eq!(s.passive_down_until(103), Some(10_102));
        assert!(!s.is_available(10_101));
        assert!(
            s.is_available(10_102),
            "available again once fail_duration passed"
        );
    }

    #[test]
    fn each_breaker_close_is_claimed_once() {
        let s = BackendState::new();
        assert_eq!(s.claim_breaker_close(1), BreakerClose::Nothing);
        let once = Breaker {
            max_fails: 1,
            fail_duration_ms: 100,
        };
        let first = s.record_connect_failure(1_000, once);
        assert_eq!(
            first,
            Some(Opening {
                previous_close_unclaimed: false
            })
        );
        assert_eq!(s.claim_breaker_close(1_050), BreakerClose::OpenUntil(1_100));
        assert_eq!(s.claim_breaker_close(1_100), BreakerClose::Closed);
        assert_eq!(
            s.claim_breaker_close(1_100),
            BreakerClose::Nothing,
            "claimed once"
        );
        // Closed unclaimed, then opened again: the opening carries the close.
        s.record_connect_failure(2_000, once);
        let again = s.record_connect_failure(2_200, once);
        assert_eq!(
            again,
            Some(Opening {
                previous_close_unclaimed: true
            })
        );
        assert_eq!(s.claim_breaker_close(2_250), BreakerClose::OpenUntil(2_300));
        assert_eq!(s.claim_breaker_close(2_300), BreakerClose::Closed);
    }

    #[test]
    fn success_resets_consecutive_failures() {
        let s = BackendState::new();
        s.record_connect_failure(1, BREAKER);
        s.record_connect_failure(2, BREAKER);
        s.record_connect_success();
        assert_eq!(s.record_connect_failure(3, BREAKER), None);
        assert!(s.is_available(3));
    }

    #[test]
    fn max_fails_zero_disables_breaker() {
        let s = BackendState::new();
        let off = Breaker {
            max_fails: 0,
            fail_duration_ms: 1000,
        };
        for t in 0..10 {
            assert_eq!(s.record_connect_failure(t, off), None);
        }
        assert!(s.is_available(10));
    }

    #[test]
    fn admin_and_health_gate_availability() {
        let s = BackendState::new();
        s.set_admin(AdminState::Drain);
        assert!(!s.is_available(1));
        s.set_admin(AdminState::Ready);
        s.set_health(Health::Down);
        assert!(!s.is_available(1));
        s.set_health(Health::Up);
        assert!(s.is_available(1));
    }

    #[tokio::test]
    async fn close_order_reaches_connections_open_at_the_time_only() {
        let s = BackendState::new();
        let mut before = s.close_signal();
        s.close_connections(CloseReason::Maint);
        assert_eq!(before.recv().await, CloseReason::Maint);
        let mut after = s.close_signal();
        let later = tokio::select! {
            biased;
            _ = after.recv() => true,
            () = tokio::task::yield_now() => false,
        };
        assert!(!later, "a connection opened after the order is not closed");
        s.set_admin(AdminState::Maint);
        assert_eq!(s.standing_close(), Some(CloseReason::Maint));

        // Removed from a close_connections pool: open and opening connections close.
        let gone = BackendState::new();
        let mut open = gone.close_signal();
        gone.retire();
        assert_eq!(open.recv().await, CloseReason::BackendDown);
        assert_eq!(gone.standing_close(), Some(CloseReason::BackendDown));
    }

    #[test]
    fn drain_keeps_existing_traffic_while_maint_down_and_breaker_do_not() {
        let s = BackendState::new();
        assert!(s.may_keep_traffic(10) && s.is_available(10));
        s.set_admin(AdminState::Drain);
        assert!(!s.is_available(10), "no new connections");
        assert!(s.may_keep_traffic(10), "existing ones stay");
        s.set_admin(AdminState::Maint);
        assert!(!s.may_keep_traffic(10));
        s.set_admin(AdminState::Ready);
        s.set_status(HealthStatus::STANDBY);
        assert!(!s.may_keep_traffic(10));
        s.set_status(HealthStatus::down(DownReason::Timeout));
        assert!(!s.may_keep_traffic(10));
        s.set_status(HealthStatus::UP);
        let breaker = Breaker {
            max_fails: 1,
            fail_duration_ms: 100,
        };
        assert!(s.record_connect_failure(10, breaker).is_some());
        assert!(!s.may_keep_traffic(50), "breaker open");
        assert!(s.may_keep_traffic(110), "breaker closed again");
    }

    #[test]
    fn weight_override_set_and_cleared() {
        let s = BackendState::new();
        assert_eq!(s.weight_override(), None);
        s.set_weight_override(Some(0));
        assert_eq!(s.weight_override(), Some(0));
        s.set_weight_override(None);
        assert_eq!(s.weight_override(), None);
    }

    #[test]
    fn status_round_trips_and_passive_shows_as_down() {
        let s = BackendState::with_status(HealthStatus::down(DownReason::Pending));
        assert_eq!(s.status(), HealthStatus::down(DownReason::Pending));
        assert!(!s.is_available(crate::clock::now_ms()));
        for reason in DownReason::ALL {
            s.set_status(HealthStatus::down(reason));
            assert_eq!(s.status().reason, Some(reason));
        }
        s.set_status(HealthStatus::STANDBY);
        assert_eq!(s.health(), Health::Standby);
        assert!(!s.is_available(crate::clock::now_ms()));
        s.set_status(HealthStatus::UP);
        let now = crate::clock::now_ms();
        for _ in 0..3 {
            s.record_connect_failure(now, BREAKER);
        }
        assert_eq!(s.status(), HealthStatus::down(DownReason::Passive));
        assert_eq!(s.active_status(), HealthStatus::UP);
        assert_eq!(
            HealthStatus::down(DownReason::AuthFailed).describe(),
            "down (auth_failed)"
        );
    }

    #[test]
    fn last_check_is_recorded() {
        let s = BackendState::new();
        s.record_check(5, 120, HealthStatus::STANDBY);
        let last = s.last_check().expect("recorded");
        assert_eq!(
            (last.at_ms, last.duration_us, last.result),
            (5, 120, HealthStatus::STANDBY)
        );
    }

    #[test]
    fn guard_counts_active_connections() {
        let s = Arc::new(BackendState::new());
        let a = s.connection_opened();
        let b = s.connection_opened();
        assert_eq!(s.active(), 2);
        drop(a);
        assert_eq!(s.active(), 1);
        drop(b);
        assert_eq!(s.active(), 0);
    }
}
