//! Every exported metric name, in one place, so dashboards and alerts can be checked
//! against them (`tests/deploy.rs`, `tests/ops.rs`).

pub const LISTENER_CONNECTIONS_ACCEPTED: &str = "switchyard_listener_connections_accepted_total";
pub const LISTENER_CONNECTIONS_REJECTED: &str = "switchyard_listener_connections_rejected_total";
pub const LISTENER_CONNECTIONS_ACTIVE: &str = "switchyard_listener_connections_active";
pub const LISTENER_CONNECTIONS_CLOSED: &str = "switchyard_listener_connections_closed_total";
pub const LISTENER_ACCEPT_ERRORS: &str = "switchyard_listener_accept_errors_total";
pub const LISTENER_BYTES_FROM_CLIENTS: &str = "switchyard_listener_bytes_from_clients_total";
pub const LISTENER_BYTES_TO_CLIENTS: &str = "switchyard_listener_bytes_to_clients_total";
pub const BACKEND_CONNECT_ATTEMPTS: &str = "switchyard_backend_connect_attempts_total";
pub const BACKEND_CONNECT_FAILURES: &str = "switchyard_backend_connect_failures_total";
pub const BACKEND_CONNECT_DURATION: &str = "switchyard_backend_connect_duration_seconds";
pub const BACKEND_BREAKER_OPENED: &str = "switchyard_backend_passive_down_total";
pub const POOL_RETRIES: &str = "switchyard_pool_connect_retries_total";
pub const BACKEND_BYTES_FROM_CLIENTS: &str = "switchyard_backend_bytes_from_clients_total";
pub const BACKEND_BYTES_TO_CLIENTS: &str = "switchyard_backend_bytes_to_clients_total";
// Read from live backend state at scrape time (admin::exporter).
pub const BACKEND_CONNECTIONS_ACTIVE: &str = "switchyard_backend_connections_active";
pub const BACKEND_UP: &str = "switchyard_backend_up";
pub const BACKEND_STATE: &str = "switchyard_backend_state";
pub const BACKEND_WEIGHT: &str = "switchyard_backend_weight";
pub const CONFIG_RELOADS: &str = "switchyard_config_reloads_total";
pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "switchyard_config_last_reload_successful";
pub const CONFIG_LAST_RELOAD_SUCCESS_TIME: &str =
    "switchyard_config_last_reload_success_timestamp_seconds";
pub const ACCESS_LOG_RECORDS: &str = "switchyard_access_log_records_total";
pub const ACCESS_LOG_DROPPED: &str = "switchyard_access_log_dropped_total";
pub const ACCESS_LOG_WRITE_ERRORS: &str = "switchyard_access_log_write_errors_total";
pub const ADMIN_AUTH_FAILURES: &str = "switchyard_admin_auth_failures_total";
pub const BUILD_INFO: &str = "switchyard_build_info";
pub const READY: &str = "switchyard_ready";
// Process metrics, read from /proc at scrape time; the names every exporter uses.
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
pub const PROCESS_RSS: &str = "process_resident_memory_bytes";
pub const PROCESS_VSZ: &str = "process_virtual_memory_bytes";
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
pub const PROCESS_START_TIME: &str = "process_start_time_seconds";
pub const UDP_FLOWS_ACTIVE: &str = "switchyard_udp_flows_active";
pub const UDP_FLOWS_CREATED: &str = "switchyard_udp_flows_created_total";
pub const UDP_FLOWS_EXPIRED: &str = "switchyard_udp_flows_expired_total";
pub const UDP_DATAGRAMS_FROM_CLIENTS: &str = "switchyard_udp_datagrams_from_clients_total";
pub const UDP_DATAGRAMS_TO_CLIENTS: &str = "switchyard_udp_datagrams_to_clients_total";
pub const UDP_BYTES_FROM_CLIENTS: &str = "switchyard_udp_bytes_from_clients_total";
pub const UDP_BYTES_TO_CLIENTS: &str = "switchyard_udp_bytes_to_clients_total";
pub const UDP_DATAGRAMS_DROPPED: &str = "switchyard_udp_datagrams_dropped_total";
pub const BACKEND_UDP_UNREACHABLE: &str = "switchyard_backend_udp_unreachable_total";
pub const UDP_UPSTREAM_SOCKETS_REUSED: &str = "switchyard_udp_upstream_sockets_reused_total";
pub const UDP_UPSTREAM_SOCKETS_SPARE: &str = "switchyard_udp_upstream_sockets_spare";

/// 1 for the reason of a down backend, 0 for the other reasons (all 0 when not down).
pub const BACKEND_DOWN_REASON: &str = "switchyard_backend_down_reason";
pub const BACKEND_STATE_CHANGES: &str = "switchyard_backend_state_changes_total";
pub const HEALTH_CHECK_DURATION: &str = "switchyard_health_check_duration_seconds";
pub const HEALTH_CHECKS: &str = "switchyard_health_checks_total";
pub const POOL_SPLIT_BRAIN: &str = "switchyard_pool_split_brain_total";
pub const POOL_FALLBACK: &str = "switchyard_pool_fallback_total";

/// Every metric family the balancer exports (dashboards and alerts are checked against it).
pub const ALL: &[&str] = &[
    LISTENER_CONNECTIONS_ACCEPTED,
    LISTENER_CONNECTIONS_REJECTED,
    LISTENER_CONNECTIONS_ACTIVE,
    LISTENER_CONNECTIONS_CLOSED,
    LISTENER_ACCEPT_ERRORS,
    LISTENER_BYTES_FROM_CLIENTS,
    LISTENER_BYTES_TO_CLIENTS,
    BACKEND_CONNECT_ATTEMPTS,
    BACKEND_CONNECT_FAILURES,
    BACKEND_CONNECT_DURATION,
    BACKEND_BREAKER_OPENED,
    POOL_RETRIES,
    BACKEND_BYTES_FROM_CLIENTS,
    BACKEND_BYTES_TO_CLIENTS,
    BACKEND_DOWN_REASON,
    BACKEND_STATE_CHANGES,
    HEALTH_CHECK_DURATION,
    HEALTH_CHECKS,
    POOL_SPLIT_BRAIN,
    POOL_FALLBACK,
    BACKEND_CONNECTIONS_ACTIVE,
    BACKEND_UP,
    BACKEND_STATE,
    BACKEND_WEIGHT,
    CONFIG_RELOADS,
    CONFIG_LAST_RELOAD_SUCCESSFUL,
    CONFIG_LAST_RELOAD_SUCCESS_TIME,
    ACCESS_LOG_RECORDS,
    ACCESS_LOG_DROPPED,
    ACCESS_LOG_WRITE_ERRORS,
    ADMIN_AUTH_FAILURES,
    BUILD_INFO,
    READY,
    PROCESS_CPU,
    PROCESS_RSS,
    PROCESS_VSZ,
    PROCESS_OPEN_FDS,
    PROCESS_MAX_FDS,
    PROCESS_START_TIME,
    UDP_FLOWS_ACTIVE,
    UDP_FLOWS_CREATED,
    UDP_FLOWS_EXPIRED,
    UDP_DATAGRAMS_FROM_CLIENTS,
    UDP_DATAGRAMS_TO_CLIENTS,
    UDP_BYTES_FROM_CLIENTS,
    UDP_BYTES_TO_CLIENTS,
    UDP_DATAGRAMS_DROPPED,
    BACKEND_UDP_UNREACHABLE,
    UDP_UPSTREAM_SOCKETS_REUSED,
    UDP_UPSTREAM_SOCKETS_SPARE,
];
