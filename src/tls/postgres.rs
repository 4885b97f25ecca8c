//! The Postgres bytes that come before TLS: a client asks for TLS with an 8-byte SSLRequest
//! and waits for one byte, `S`, before its ClientHello (PostgreSQL 17 clients may also start
//! TLS at once, `sslnegotiation=direct`, with ALPN `postgresql`). [`classify`] tells these
//! openings apart from a plain StartupMessage; [`error_response`] builds the ErrorResponse
//! that refuses a plain client. Pure, no I/O.

/// SSLRequest: length 8, then the code 1234.5679.
pub const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// GSSENCRequest: length 8, then the code 1234.5680.
pub const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
/// The server's answer to an SSLRequest it accepts.
pub const SSL_ACCEPTED: u8 = b'S';
/// The server's answer to a request it declines (used for GSSENCRequest).
pub const DECLINED: u8 = b'N';
/// The ALPN protocol PostgreSQL 17 requires for direct TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";
/// First byte of a TLS handshake record (direct TLS).
const TLS_HANDSHAKE: u8 = 22;

/// How a Postgres client opened the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Fewer bytes than needed to tell.
    Incomplete,
    /// An SSLRequest (the 8 bytes at the start): answer `S`, then a ClientHello follows.
    SslRequest,
    /// A GSSENCRequest: answer `N`; the client then sends an SSLRequest or a StartupMessage.
    GssEncRequest,
    /// Direct TLS: the bytes are a TLS record, no SSLRequest first.
    DirectTls,
    /// Anything else (a StartupMessage, a CancelRequest...): plaintext Postgres.
    Plain,
}

/// Classifies the first bytes a Postgres client sent. A decision taken on a prefix stays the
/// same when more bytes arrive.
pub fn classify(bytes: &[u8]) -> Opening {
    match bytes.first() {
        None => return Opening::Incomplete,
        Some(&TLS_HANDSHAKE) => return Opening::DirectTls,
        Some(_) => {}
    }
    let matches_prefix = |request: &[u8; 8]| request.starts_with(&bytes[..bytes.len().min(8)]);
    if bytes.len() < 8 {
        // Still possibly one of the 8-byte requests: wait. Otherwise it is plain already.
        if matches_prefix(&SSL_REQUEST) || matches_prefix(&GSSENC_REQUEST) {
            return Opening::Incomplete;
        }
        return Opening::Plain;
    }
    if bytes[..8] == SSL_REQUEST {
        Opening::SslRequest
    } else if bytes[..8] == GSSENC_REQUEST {
        Opening::GssEncRequest
    } else {
        Opening::Plain
    }
}

/// A FATAL ErrorResponse with SQLSTATE 28000 and `message`, as a server sends it before
/// closing a connection it will not serve.
pub fn error_response(message: &str) -> Vec<u8> {
    let mut fields = Vec::with_capacity(message.len() + 32);
    for (code, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', "28000"),
        (b'M', message),
    ] {
        fields.push(code);
        // A NUL would end the field early; the messages are ours, but keep the frame valid.
        fields.extend(value.bytes().filter(|&b| b != 0));
        fields.push(0);
    }
    fields.push(0);
    let mut out = Vec::with_capacity(fields.len() + 5);
    out.push(b'E');
    out.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&fields);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_openings() {
        assert_eq!(classify(&[]), Opening::Incomplete);
        assert_eq!(classify(&SSL_REQUEST[..5]), Opening::Incomplete);
        assert_eq!(classify(&SSL_REQUEST), Opening::SslRequest);
        assert_eq!(classify(&GSSENC_REQUEST), Opening::GssEncRequest);
        assert_eq!(classify(&[22, 3, 1]), Opening::DirectTls);
        // A StartupMessage: length, protocol 3.0, "user\0x\0\0".
        let mut startup = vec![0, 0, 0, 17, 0, 3, 0, 0];
        startup.extend_from_slice(b"user\0x\0\0\0");
        assert_eq!(classify(&startup[..3]), Opening::Incomplete);
        assert_eq!(classify(&startup[..5]), Opening::Plain);
        assert_eq!(classify(&startup), Opening::Plain);
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Opening::Plain);
    }

    #[test]
    fn classify_is_prefix_stable() {
        let inputs: [&[u8]; 4] = [
            &SSL_REQUEST,
            &GSSENC_REQUEST,
            &[0, 0, 0, 8, 4, 210, 22, 1],
            &[0, 0, 1, 0, 0, 3, 0, 0, 1],
        ];
        for input in inputs {
            let full = classify(input);
            for k in 0..input.len() {
                let part = classify(&input[..k]);
                assert!(
                    part == Opening::Incomplete || part == full,
                    "{input:?}[..{k}]"
                );
            }
        }
    }

    #[test]
    fn error_response_frame() {
        let e = error_response("TLS required");
        assert_eq!(e[0], b'E');
        let len = u32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize;
        assert_eq!(len + 1, e.len());
        assert!(e.ends_with(b"MTLS required\0\0"));
        assert!(e.windows(7).any(|w| w == b"C28000\0"));
    }
}
