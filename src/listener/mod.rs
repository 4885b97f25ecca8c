//! Listeners: bind sockets and take in clients. `tcp` accepts connections; `udp` receives
//! datagrams and keeps a flow per client address; `set` is the running set of listeners
//! that reloads change.

pub mod set;
pub mod tcp;
pub mod udp;
