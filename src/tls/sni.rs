//! The TLS ClientHello, read without terminating TLS: from the first bytes a client sends,
//! possibly split over several records and several reads, find the server name (SNI) and the
//! ALPN protocols. [`parse`] is pure and incremental: give it every byte seen so far and it
//! answers `Complete`, `Incomplete` (read more) or a typed error. A decision taken on a
//! prefix never changes when more bytes arrive, so a caller may call it after every read.
//! Input is bounded: the handshake message at [`MAX_HELLO_LEN`], the bytes examined at
//! [`MAX_INPUT`]. TLS 1.0 to 1.3 hellos; SSLv2-compatible hellos are refused as not TLS.

use std::fmt;

/// Largest ClientHello handshake message accepted, its 4-byte header included.
pub const MAX_HELLO_LEN: usize = 16 * 1024;
/// Most bytes examined: the hello plus the headers of the records it is split over.
pub const MAX_INPUT: usize = MAX_HELLO_LEN + 1024;
/// Largest TLS plaintext record fragment (RFC 8446 5.1).
const MAX_RECORD_LEN: usize = 1 << 14;
const RECORD_HEADER_LEN: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const NAME_TYPE_HOST: u8 = 0;
/// Longest DNS name (without the trailing dot).
pub const MAX_HOST_LEN: usize = 253;

/// What a ClientHello tells before any key is agreed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The requested server name, lowercased, trailing dot removed; None when none was sent.
    pub sni: Option<String>,
    /// ALPN protocols in the client's order of preference (`h2`, `postgresql`, ...).
    pub alpn: Vec<Vec<u8>>,
    /// The highest TLS version offered: 0x0304 for TLS 1.3, else the legacy version field.
    pub version: u16,
}

impl ClientHello {
    /// Whether the client offers `protocol` by ALPN.
    pub fn offers_alpn(&self, protocol: &[u8]) -> bool {
        self.alpn.iter().any(|p| p == protocol)
    }

    /// ALPN protocols for logs, comma separated (non-UTF-8 bytes replaced).
    pub fn alpn_list(&self) -> String {
        let names: Vec<String> = self
            .alpn
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        names.join(",")
    }
}

/// The result of looking at the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// The whole ClientHello was seen.
    Complete(ClientHello),
    /// Well formed so far; read more bytes and call again with all of them.
    Incomplete,
}

/// Why the bytes are not a usable ClientHello. The connection should be closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloError {
    /// A record of another content type (alert, application data...) or not TLS at all.
    NotHandshake(u8),
    /// A record whose version field is not TLS (major version 3).
    RecordVersion(u16),
    /// A record fragment of length 0 or above 2^14.
    RecordLength(usize),
    /// The first handshake message is not a ClientHello.
    NotClientHello(u8),
    /// The hello is larger than [`MAX_HELLO_LEN`], or spread over more than [`MAX_INPUT`].
    TooLarge,
    /// The hello's structure is broken; the text says where.
    Malformed(&'static str),
}

impl HelloError {
    /// Whether the bytes were not TLS at all (rather than a broken TLS handshake).
    pub fn is_not_tls(self) -> bool {
        matches!(
            self,
            HelloError::NotHandshake(_) | HelloError::RecordVersion(_)
        )
    }
}

impl fmt::Display for HelloError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HelloError::NotHandshake(t) => write!(f, "not a TLS handshake record (byte {t:#04x})"),
            HelloError::RecordVersion(v) => write!(f, "record version {v:#06x} is not TLS"),
            HelloError::RecordLength(n) => write!(f, "record length {n} out of range 1..=16384"),
            HelloError::NotClientHello(t) => {
                write!(f, "first handshake message has type {t}, not ClientHello")
            }
            HelloError::TooLarge => write!(f, "ClientHello larger than {MAX_HELLO_LEN} bytes"),
            HelloError::Malformed(what) => write!(f, "malformed ClientHello: {what}"),
        }
    }
}

impl std::error::Error for HelloError {}

/// Parses the ClientHello from `input`, every byte the client sent so far.
pub fn parse(input: &[u8]) -> Result<Parsed, HelloError> {
    // Bytes past MAX_INPUT are never looked at, so the answer for a longer input is the
    // answer for its first MAX_INPUT bytes.
    let input = &input[..input.len().min(MAX_INPUT)];
    let mut handshake: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        let header = &input[pos..];
        // Check what there is of the record header, so non-TLS input fails on its first byte.
        if let Some(&content_type) = header.first() {
            if content_type != CONTENT_HANDSHAKE {
                return Err(HelloError::NotHandshake(content_type));
            }
        }
        if header.len() >= 3 {
            let version = u16::from_be_bytes([header[1], header[2]]);
            if header[1] != 3 || header[2] > 4 {
                return Err(HelloError::RecordVersion(version));
            }
        }
        if header.len() < RECORD_HEADER_LEN {
            return incomplete(input.len());
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 || len > MAX_RECORD_LEN {
            return Err(HelloError::RecordLength(len));
        }
        let start = pos + RECORD_HEADER_LEN;
        let Some(fragment) = input.get(start..start + len) else {
            return incomplete(input.len());
        };
        pos = start + len;
        handshake.extend_from_slice(fragment);

        if handshake[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(HelloError::NotClientHello(handshake[0]));
        }
        if handshake.len() < 4 {
            continue;
        }
        let body_len = usize::from(handshake[1]) << 16
            | usize::from(handshake[2]) << 8
            | usize::from(handshake[3]);
        if 4 + body_len > MAX_HELLO_LEN {
            return Err(HelloError::TooLarge);
        }
        if handshake.len() >= 4 + body_len {
            return parse_body(&handshake[4..4 + body_len]).map(Parsed::Complete);
        }
    }
}

/// Out of bytes: read more, unless the bound is reached.
fn incomplete(seen: usize) -> Result<Parsed, HelloError> {
    if seen >= MAX_INPUT {
        Err(HelloError::TooLarge)
    } else {
        Ok(Parsed::Incomplete)
    }
}

fn parse_body(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader::new(body);
    let legacy_version = r.u16("client version")?;
    if legacy_version >> 8 != 3 {
        return Err(HelloError::Malformed("client version is not TLS"));
    }
    r.take(32, "random")?;
    let session_id = r.vec8("session id")?;
    if session_id.len() > 32 {
        return Err(HelloError::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec16("cipher suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher suites"));
    }
    if r.vec8("compression methods")?.is_empty() {
        return Err(HelloError::Malformed("no compression method"));
    }
    let mut hello = ClientHello {
        sni: None,
        alpn: Vec::new(),
        version: legacy_version,
    };
    if r.is_empty() {
        // TLS 1.2 and earlier may omit the extensions block.
        return Ok(hello);
    }
    let mut extensions = Reader::new(r.vec16("extensions")?);
    if !r.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    let mut seen: Vec<u16> = Vec::new();
    while !extensions.is_empty() {
        let kind = extensions.u16("extension type")?;
        let data = extensions.vec16("extension data")?;
        if seen.contains(&kind) {
            return Err(HelloError::Malformed("duplicate extension"));
        }
        seen.push(kind);
        match kind {
            EXT_SERVER_NAME => hello.sni = server_name(data)?,
            EXT_ALPN => hello.alpn = alpn(data)?,
            EXT_SUPPORTED_VERSIONS if supported_versions(data)? => hello.version = 0x0304,
            _ => {}
        }
    }
    Ok(hello)
}

/// The server_name extension (RFC 6066 3): the host_name entry, normalized. Clients may
/// send an empty extension; other name types are skipped.
fn server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    if data.is_empty() {
        return Ok(None);
    }
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.vec16("server name list")?);
    if !outer.is_empty() {
        return Err(HelloError::Malformed("bytes after the server name list"));
    }
    if list.is_empty() {
        return Err(HelloError::Malformed("empty server name list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8("server name type")?;
        let name = list.vec16("server name")?;
        if name_type != NAME_TYPE_HOST {
            continue;
        }
        if host.is_some() {
            return Err(HelloError::Malformed("two host names"));
        }
        let text = std::str::from_utf8(name)
            .map_err(|_| HelloError::Malformed("server name is not ASCII"))?;
        host = Some(
            normalize_host(text).ok_or(HelloError::Malformed("server name is not a host name"))?,
        );
    }
    Ok(host)
}

/// The ALPN extension (RFC 7301 3.1): a non-empty list of non-empty protocol names.
fn alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut outer = Reader::new(data);
    let mut list = Reader::new(outer.vec16("ALPN list")?);
    if !outer.is_empty() || list.is_empty() {
        return Err(HelloError::Malformed("ALPN list"));
    }
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let name = list.vec8("ALPN protocol")?;
        if name.is_empty() {
            return Err(HelloError::Malformed("empty ALPN protocol"));
        }
        protocols.push(name.to_vec());
    }
    Ok(protocols)
}

/// supported_versions (RFC 8446 4.2.1): whether TLS 1.3 is offered.
fn supported_versions(data: &[u8]) -> Result<bool, HelloError> {
    let mut outer = Reader::new(data);
    let list = outer.vec8("supported versions")?;
    if !outer.is_empty() || list.is_empty() || list.len() % 2 != 0 {
        return Err(HelloError::Malformed("supported versions"));
    }
    Ok(list.chunks_exact(2).any(|v| v == [3, 4]))
}

/// A DNS host name as SNI carries it and as routes name it: ASCII letters, digits, `-` and
/// `_` in dot-separated labels of 1 to 63 bytes, at most 253 bytes. Returns it lowercased
/// without a trailing dot; None when it is not such a name.
pub fn normalize_host(name: &str) -> Option<String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_HOST_LEN {
        return None;
    }
    let valid = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    valid.then(|| name.to_ascii_lowercase())
}

/// A bounds-checked cursor; every failure names the field being read.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.buf.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u8(what)?);
        self.take(n, what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = usize::from(self.u16(what)?);
        self.take(n, what)
    }
}

/// Builds a minimal but valid TLS 1.2-style ClientHello record (for tests and the fuzz
/// corpus): one cipher suite, the given SNI and ALPN extensions, `padding` bytes of an
/// unknown extension to reach a size.
pub fn build_client_hello(sni: Option<&str>, alpn: &[&[u8]], padding: usize) -> Vec<u8> {
    fn push16(out: &mut Vec<u8>, n: usize) {
        out.extend_from_slice(&(n as u16).to_be_bytes());
    }
    let mut ext = Vec::new();
    if let Some(name) = sni {
        ext.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
        push16(&mut ext, name.len() + 5);
        push16(&mut ext, name.len() + 3);
        ext.push(NAME_TYPE_HOST);
        push16(&mut ext, name.len());
        ext.extend_from_slice(name.as_bytes());
    }
    if !alpn.is_empty() {
        let list: usize = alpn.iter().map(|p| p.len() + 1).sum();
        ext.extend_from_slice(&EXT_ALPN.to_be_bytes());
        push16(&mut ext, list + 2);
        push16(&mut ext, list);
        for p in alpn {
            ext.push(p.len() as u8);
            ext.extend_from_slice(p);
        }
    }
    if padding > 0 {
        ext.extend_from_slice(&21u16.to_be_bytes());
        push16(&mut ext, padding);
        ext.extend(std::iter::repeat_n(0u8, padding));
    }
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
    body.extend_from_slice(&[1, 0]); // null compression
    push16(&mut body, ext.len());
    body.extend_from_slice(&ext);
    let mut handshake = vec![HANDSHAKE_CLIENT_HELLO];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut out = Vec::with_capacity(handshake.len() + 5 * (handshake.len() / MAX_RECORD_LEN + 1));
    for fragment in handshake.chunks(MAX_RECORD_LEN) {
        out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
        push16(&mut out, fragment.len());
        out.extend_from_slice(fragment);
    }
    out
}

/// Re-splits a stream of records into records of at most `size` fragment bytes each (the
/// same handshake bytes, more record headers), as a client may legally send them.
pub fn resplit_records(records: &[u8], size: usize) -> Vec<u8> {
    let mut payload = Vec::new();
    let mut pos = 0;
    let mut header = [CONTENT_HANDSHAKE, 3, 1];
    while pos + RECORD_HEADER_LEN <= records.len() {
        header.copy_from_slice(&records[pos..pos + 3]);
        let len = usize::from(u16::from_be_bytes([records[pos + 3], records[pos + 4]]));
        let end = (pos + RECORD_HEADER_LEN + len).min(records.len());
        payload.extend_from_slice(&records[pos + RECORD_HEADER_LEN..end]);
        pos = end;
    }
    let mut out = Vec::new();
    for fragment in payload.chunks(size.max(1)) {
        out.extend_from_slice(&header);
        out.extend_from_slice(&(fragment.len() as u16).to_be_bytes());
        out.extend_from_slice(fragment);
    }
    out
}

#[cfg(test)]
mod tests;
