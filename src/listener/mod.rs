//! Listeners: bind sockets and accept connections (`tcp`), and the running set of them
//! that reloads change (`set`). TCP only for now; the UDP flow listener joins as `udp`.

pub mod set;
pub mod tcp;
