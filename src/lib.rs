//! Switchyard: an L4 (TCP and UDP) load balancer.
//!
//! The library drives everything; the `switchyard` binary is a thin CLI over [`Server`].
//! Module map: `config` (file → validated config), `state` (snapshot + live backend state),
//! `backend` (identity, atomics, passive breaker), `balance` (selection algorithms),
//! `listener` (bind/accept), `conn` (one connection), `forward` (the byte path),
//! `metrics` (names and handles), `server` (start and graceful stop), `udp` (flow table and
//! batched datagram syscalls; `udp::sys` is the one module allowed `unsafe`).

pub mod backend;
pub mod balance;
pub mod clock;
pub mod config;
pub mod conn;
pub mod forward;
pub mod hash;
pub mod listener;
pub mod log;
pub mod metrics;
pub mod server;
pub mod state;
pub mod udp;

pub use config::Config;
pub use server::{run, Server};
