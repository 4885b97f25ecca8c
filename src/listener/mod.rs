//! Listeners: bind sockets and accept connections. TCP only for now; the UDP flow listener
//! joins this module as `udp`.

pub mod tcp;
