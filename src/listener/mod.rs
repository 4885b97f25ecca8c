//! Listeners: bind sockets and take in clients. `tcp` accepts connections; `udp` receives
//! datagrams and keeps a flow per client address.

pub mod tcp;
pub mod udp;
