//! UDP flow forwarding, the parts below the listener loop: the flow table ([`flow`]), the
//! upstream sockets flows borrow ([`upstream`]) and the spares kept for reuse ([`spare`]),
//! the generational slab both keep their entries in ([`slots`]),
//! the batched datagram syscalls and epoll registration ([`sys`], the crate's one module
//! allowed `unsafe`), and the bounded reasons a flow ends or a datagram is dropped (metric
//! labels and log fields). The listener loop that drives them is `listener::udp`.

pub mod flow;
pub mod slots;
pub mod spare;
#[allow(unsafe_code)]
pub mod sys;
pub mod upstream;

/// Why a flow ended: a bounded set, used as a metric label and in the flow's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowEnd {
    /// No datagram either way for `idle_timeout`.
    IdleTimeout,
    /// Every client datagram had its `responses` replies.
    Responses,
    /// The backend went down (health, breaker) or into maint; the client's next datagram
    /// started a new flow on another backend.
    BackendDown,
    /// The backend answered with ICMP port unreachable; the client's next datagram started
    /// a new flow on another backend.
    BackendRefused,
    /// The balancer stopped.
    Shutdown,
}

impl FlowEnd {
    pub const ALL: [FlowEnd; 5] = [
        FlowEnd::IdleTimeout,
        FlowEnd::Responses,
        FlowEnd::BackendDown,
        FlowEnd::BackendRefused,
        FlowEnd::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FlowEnd::IdleTimeout => "idle_timeout",
            FlowEnd::Responses => "responses",
            FlowEnd::BackendDown => "backend_down",
            FlowEnd::BackendRefused => "backend_refused",
            FlowEnd::Shutdown => "shutdown",
        }
    }
}

/// Why a datagram was not forwarded: a bounded set, used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// It would have started a flow beyond `max_flows`.
    MaxFlows,
    /// No backend of the pool was available for a new flow.
    NoBackend,
    /// No upstream socket could be opened (file descriptors exhausted, ...).
    SocketError,
    /// Sending it to the backend failed (refused, buffer full).
    SendError,
    /// Sending a reply to the client failed.
    ClientSendError,
    /// A reply beyond the flow's `responses` (also one reaching its socket after the flow
    /// ended, while the socket rests as a spare).
    ExtraReply,
    /// Longer than the 64 KiB receive slot (cut by the kernel).
    Truncated,
    /// It would have started a flow while the balancer is stopping.
    Shutdown,
}

impl DropReason {
    pub const ALL: [DropReason; 8] = [
        DropReason::MaxFlows,
        DropReason::NoBackend,
        DropReason::SocketError,
        DropReason::SendError,
        DropReason::ClientSendError,
        DropReason::ExtraReply,
        DropReason::Truncated,
        DropReason::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::MaxFlows => "max_flows",
            DropReason::NoBackend => "no_backend",
            DropReason::SocketError => "socket_error",
            DropReason::SendError => "send_error",
            DropReason::ClientSendError => "client_send_error",
            DropReason::ExtraReply => "extra_reply",
            DropReason::Truncated => "truncated",
            DropReason::Shutdown => "shutdown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, r) in FlowEnd::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
