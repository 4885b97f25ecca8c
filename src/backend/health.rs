//! The health a backend is in, as every reader sees it: up, standby (healthy, wrong role
//! here), or down with a reason; packed into one atomic word in `BackendState`.

/// Result of health checking, active and passive combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Eligible for new connections.
    Up = 0,
    /// Not eligible; why is in [`HealthStatus::reason`].
    Down = 1,
    /// Reachable and healthy but in the wrong role for this pool (a replica in a
    /// primary-only pool): not eligible here, and not a failure.
    Standby = 2,
}

impl Health {
    pub const ALL: [Health; 3] = [Health::Up, Health::Down, Health::Standby];

    /// The metric label and log spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Up => "up",
            Health::Down => "down",
            Health::Standby => "standby",
        }
    }
}

/// Why a backend is down: a bounded set, used as a metric label and in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DownReason {
    /// No check has passed `rise` times yet.
    Pending = 1,
    /// Connecting failed (refused, reset, unreachable) or the server is shutting down.
    Unreachable = 2,
    /// The check did not finish within its `timeout`.
    Timeout = 3,
    /// The server refused the monitoring credentials.
    AuthFailed = 4,
    /// The server is in no role this pool can use (an arbiter, a foreign replica set).
    WrongRole = 5,
    /// A replica further behind than `max_replication_lag`.
    Lagging = 6,
    /// Another primary of the pool wins (newer timeline), or primaries are tied.
    SplitBrain = 7,
    /// The passive breaker: consecutive connect failures on the data path.
    Passive = 8,
    /// The server answered, but not as a healthy server does (an error, a bad reply).
    CheckError = 9,
}

impl DownReason {
    pub const ALL: [DownReason; 9] = [
        DownReason::Pending,
        DownReason::Unreachable,
        DownReason::Timeout,
        DownReason::AuthFailed,
        DownReason::WrongRole,
        DownReason::Lagging,
        DownReason::SplitBrain,
        DownReason::Passive,
        DownReason::CheckError,
    ];

    /// The metric label and log spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DownReason::Pending => "pending",
            DownReason::Unreachable => "unreachable",
            DownReason::Timeout => "timeout",
            DownReason::AuthFailed => "auth_failed",
            DownReason::WrongRole => "wrong_role",
            DownReason::Lagging => "lagging",
            DownReason::SplitBrain => "split_brain",
            DownReason::Passive => "passive",
            DownReason::CheckError => "check_error",
        }
    }

    fn from_code(code: u8) -> Option<DownReason> {
        DownReason::ALL.iter().copied().find(|r| *r as u8 == code)
    }
}

/// A backend's health with the reason when it is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthStatus {
    pub health: Health,
    /// Set when `health` is `Down` (None only for a bare `set_health(Health::Down)`).
    pub reason: Option<DownReason>,
}

impl HealthStatus {
    pub const UP: HealthStatus = HealthStatus {
        health: Health::Up,
        reason: None,
    };
    pub const STANDBY: HealthStatus = HealthStatus {
        health: Health::Standby,
        reason: None,
    };

    pub fn down(reason: DownReason) -> HealthStatus {
        HealthStatus {
            health: Health::Down,
            reason: Some(reason),
        }
    }

    /// `up`, `standby`, or `down (reason)`.
    pub fn describe(self) -> String {
        match self.reason {
            Some(r) => format!("{} ({})", self.health.as_str(), r.as_str()),
            None => self.health.as_str().to_string(),
        }
    }

    pub(super) fn encode(self) -> u8 {
        self.health as u8 | (self.reason.map_or(0, |r| r as u8) << 2)
    }

    pub(super) fn decode(code: u8) -> HealthStatus {
        let health = match code & 3 {
            0 => Health::Up,
            2 => Health::Standby,
            _ => Health::Down,
        };
        HealthStatus {
            health,
            reason: DownReason::from_code(code >> 2),
        }
    }
}

/// The last active check of a backend, for the admin view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastCheck {
    /// `clock::now_ms` when the check finished.
    pub at_ms: u64,
    pub duration_us: u64,
    /// What this one check found (before rise/fall).
    pub result: HealthStatus,
}
