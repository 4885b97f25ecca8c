//! Switchyard: an L4 (TCP and UDP) load balancer.
//!
//! The library drives everything; the `switchyard` binary is a thin CLI over [`Server`].
//! Module map: `config` (file → validated config), `state` (snapshot + live backend state),
//! `backend` (identity, atomics, passive breaker), `balance` (selection algorithms),
//! `listener` (bind/accept), `conn` (one connection), `forward` (the byte path),
//! `metrics` (names and handles), `server` (start and graceful stop), `health` (active
//! checks and the database-role state machine), `control` (reload, admin changes), `admin`
//! (HTTP: metrics, status page, admin API), `access_log`, `upgrade` (socket hand-over to a
//! new binary), `route` (PROXY header, ACL, TLS passthrough by SNI before the balancer) over
//! the pure parsers `acl`, `proxy_protocol` and `tls`,
//! `udp` (flow table and batched datagram syscalls; `udp::sys` is the one module allowed
//! `unsafe` besides the socket hand-over in `upgrade`).

pub mod access_log;
pub mod acl;
pub mod admin;
pub mod backend;
pub mod balance;
pub mod clock;
pub mod config;
pub mod conn;
pub mod control;
pub mod forward;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod hash;
pub mod health;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod proxy_protocol;
pub mod route;
pub mod server;
pub mod state;
pub mod tls;
pub mod udp;
pub mod upgrade;

pub use config::Config;
pub use server::{run, Server};
