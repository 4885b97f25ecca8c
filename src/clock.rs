//! A coarse monotonic clock in milliseconds, shared by the passive circuit breaker and
//! (later) the health state machine. Pure cores take `now_ms` as an argument; only the
//! edges call [`now_ms`], so tests can drive time by hand.

use std::sync::OnceLock;
use std::time::Instant;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Milliseconds since the first call in this process; never 0, so 0 can mean "unset".
pub fn now_ms() -> u64 {
    let epoch = EPOCH.get_or_init(Instant::now);
    epoch.elapsed().as_millis() as u64 + 1
}
