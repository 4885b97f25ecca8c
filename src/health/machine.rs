//! The rise/fall state machine of one backend's active check: pure, with no clock and no
//! I/O, so every threshold rule is unit-tested. It turns a stream of single-check results
//! into a decided [`HealthStatus`]; the pool-wide rules (split brain) come after it, in
//! [`super::arbiter`].

use crate::backend::{Health, HealthStatus};

/// Consecutive-result counters for one backend.
#[derive(Debug, Clone)]
pub struct Machine {
    rise: u32,
    fall: u32,
    current: HealthStatus,
    /// The class (up / standby / down) the current streak of results has, and its length.
    streak_class: Health,
    streak: u32,
}

impl Machine {
    /// Starts from `current`: the backend's state as carried across rebuilds (down, pending
    /// for a new backend; up with `initial_state: up`).
    pub fn new(rise: u32, fall: u32, current: HealthStatus) -> Machine {
        Machine {
            rise: rise.max(1),
            fall: fall.max(1),
            current,
            streak_class: current.health,
            streak: 0,
        }
    }

    pub fn current(&self) -> HealthStatus {
        self.current
    }

    /// Feeds one check result; returns the decided state.
    ///
    /// - Going down takes `fall` consecutive failures; coming back (to up or standby) takes
    ///   `rise` consecutive passes. A new backend starts down (pending), so it needs `rise`.
    /// - Up to standby is immediate: the database itself says it changed role (a demoted
    ///   primary), which is no flapping network and must stop writes at once.
    /// - While down, the reason follows the latest failure.
    pub fn observe(&mut self, result: HealthStatus) -> HealthStatus {
        if result.health == self.current.health {
            self.streak = 0;
            self.streak_class = result.health;
            if result.health == Health::Down {
                self.current = result;
            }
            return self.current;
        }
        if result.health == self.streak_class {
            self.streak += 1;
        } else {
            self.streak_class = result.health;
            self.streak = 1;
        }
        let needed = match (self.current.health, result.health) {
            (Health::Up, Health::Standby) => 1,
            (_, Health::Down) => self.fall,
            _ => self.rise,
        };
        if self.streak >= needed {
            self.current = result;
            self.streak = 0;
        }
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::DownReason;

    const UP: HealthStatus = HealthStatus::UP;
    const STANDBY: HealthStatus = HealthStatus::STANDBY;

    fn down(r: DownReason) -> HealthStatus {
        HealthStatus::down(r)
    }

    #[test]
    fn new_backend_needs_rise_passes() {
        let mut m = Machine::new(2, 3, down(DownReason::Pending));
        assert_eq!(m.observe(UP), down(DownReason::Pending));
        assert_eq!(m.observe(UP), UP);
    }

    #[test]
    fn first_failure_replaces_pending_reason() {
        let mut m = Machine::new(2, 3, down(DownReason::Pending));
        assert_eq!(
            m.observe(down(DownReason::AuthFailed)),
            down(DownReason::AuthFailed)
        );
        assert_eq!(
            m.observe(down(DownReason::Timeout)),
            down(DownReason::Timeout)
        );
    }

    #[test]
    fn fall_consecutive_failures_take_it_down() {
        let mut m = Machine::new(1, 3, UP);
        assert_eq!(m.observe(down(DownReason::Unreachable)), UP);
        assert_eq!(m.observe(down(DownReason::Timeout)), UP);
        assert_eq!(m.observe(UP), UP, "a pass breaks the streak");
        assert_eq!(m.observe(down(DownReason::Unreachable)), UP);
        assert_eq!(m.observe(down(DownReason::Unreachable)), UP);
        assert_eq!(
            m.observe(down(DownReason::Timeout)),
            down(DownReason::Timeout),
            "the latest reason is the one shown"
        );
    }

    #[test]
    fn up_to_standby_is_immediate_but_standby_to_up_needs_rise() {
        let mut m = Machine::new(2, 2, UP);
        assert_eq!(m.observe(STANDBY), STANDBY);
        assert_eq!(m.observe(UP), STANDBY);
        assert_eq!(m.observe(UP), UP);
    }

    #[test]
    fn recovering_to_standby_needs_rise() {
        let mut m = Machine::new(3, 1, down(DownReason::Unreachable));
        assert_eq!(m.observe(STANDBY), down(DownReason::Unreachable));
        assert_eq!(m.observe(UP), down(DownReason::Unreachable));
        assert_eq!(m.observe(STANDBY), down(DownReason::Unreachable));
        assert_eq!(m.observe(STANDBY), down(DownReason::Unreachable));
        assert_eq!(m.observe(STANDBY), STANDBY);
        assert_eq!(
            m.observe(down(DownReason::Lagging)),
            down(DownReason::Lagging)
        );
    }
}
