//! The `mongodb` check: OP_MSG `hello` on a connection kept open between checks, falling
//! back to the legacy `isMaster` command (remembered per backend) when the server does not
//! know `hello`. The reply's `isWritablePrimary`/`ismaster`, `secondary` and `setName` are
//! matched against the pool's role and replica set: a healthy member in the other role is
//! `standby`; an arbiter or a member of another set is down (wrong role). The handful of
//! BSON this needs (one small command out, top-level fields in) is written here by hand.
//! With `proxy_protocol`, a PROXY LOCAL header is written right after connecting; with
//! `tls`, the TLS handshake follows it (see `health::tls`: encrypted, not verified).

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::Observation;
use crate::backend::{DownReason, HealthStatus};
use crate::config::health::{MongoCheck, MongoRole};

const OP_MSG: i32 = 2013;
/// Largest reply accepted; a hello reply is a few hundred bytes.
const MAX_REPLY: usize = 1 << 20;
/// MongoDB's CommandNotFound error code.
const COMMAND_NOT_FOUND: i32 = 59;

/// The monitoring connection: plain TCP, or TLS over it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

pub struct Probe {
    addr: SocketAddr,
    check: MongoCheck,
    /// PROXY LOCAL header written right after connecting, before any OP_MSG.
    proxy_header: Option<Vec<u8>>,
    /// Set when the check speaks TLS.
    tls: Option<TlsConnector>,
    stream: Option<Box<dyn Stream>>,
    /// The server answered `hello` with "no such command": use `isMaster`.
    legacy: bool,
    request_id: i32,
}

impl Probe {
    pub fn new(addr: SocketAddr, check: MongoCheck, proxy_header: Option<Vec<u8>>) -> Probe {
        let tls = check
            .tls
            .then(|| TlsConnector::from(Arc::new(super::tls::client_config())));
        Probe {
            addr,
            check,
            proxy_header,
            tls,
            stream: None,
            legacy: false,
            request_id: 0,
        }
    }

    pub fn reset(&mut self) {
        self.stream = None;
    }

    pub async fn check(&mut self) -> Observation {
        let mut reply = match self.command().await {
            Ok(r) => r,
            Err(o) => return o,
        };
        if !self.legacy && is_command_not_found(&reply) {
            self.legacy = true;
            tracing::info!(backend = %self.addr, "server does not know hello; using isMaster");
            reply = match self.command().await {
                Ok(r) => r,
                Err(o) => return o,
            };
        }
        judge(&self.check, &reply)
    }

    /// Sends `hello` (or `isMaster`) and reads the reply's fields.
    async fn command(&mut self) -> Result<Fields, Observation> {
        let result = self.round_trip().await;
        if result.is_err() {
            self.reset();
        }
        result
    }

    async fn round_trip(&mut self) -> Result<Fields, Observation> {
        let io = |what: &str, e: std::io::Error| {
            Observation::down(super::io_reason(&e), format!("{what}: {e}"))
        };
        if self.stream.is_none() {
            let mut s = TcpStream::connect(self.addr)
                .await
                .map_err(|e| io("connect", e))?;
            let _ = s.set_nodelay(true);
            if let Some(header) = &self.proxy_header {
                s.write_all(header)
                    .await
                    .map_err(|e| io("send PROXY header", e))?;
            }
            self.stream = Some(match &self.tls {
                None => Box::new(s),
                Some(tls) => {
                    let name = ServerName::IpAddress(self.addr.ip().into());
                    Box::new(
                        tls.connect(name, s)
                            .await
                            .map_err(|e| io("TLS handshake", e))?,
                    )
                }
            });
        }
        self.request_id = self.request_id.wrapping_add(1);
        let name = if self.legacy { "isMaster" } else { "hello" };
        let msg = encode_command(self.request_id, name);
        let Some(stream) = self.stream.as_mut() else {
            return Err(Observation::down(
                DownReason::Unreachable,
                "no connection".into(),
            ));
        };
        stream.write_all(&msg).await.map_err(|e| io("send", e))?;
        // TLS buffers what the socket did not take yet; plain TCP makes this a no-op.
        stream.flush().await.map_err(|e| io("send", e))?;
        let mut header = [0u8; 16];
        stream
            .read_exact(&mut header)
            .await
            .map_err(|e| io("read reply", e))?;
        let len = i32_at(&header, 0).unwrap_or(0);
        let response_to = i32_at(&header, 8).unwrap_or(0);
        let op = i32_at(&header, 12).unwrap_or(0);
        let bad = |what: String| Observation::down(DownReason::CheckError, what);
        if len < 16 + 5 || len as usize > MAX_REPLY {
            return Err(bad(format!("reply length {len} out of range")));
        }
        let mut body = vec![0u8; len as usize - 16];
        stream
            .read_exact(&mut body)
            .await
            .map_err(|e| io("read reply", e))?;
        if op != OP_MSG || response_to != self.request_id {
            return Err(bad(format!(
                "unexpected reply (opcode {op}, responseTo {response_to})"
            )));
        }
        parse_op_msg(&body).ok_or_else(|| bad("malformed OP_MSG reply".to_string()))
    }
}

/// The fields of a hello/isMaster reply the check reads.
#[derive(Debug, Default, PartialEq)]
pub struct Fields {
    pub ok: f64,
    pub writable_primary: bool,
    pub secondary: bool,
    pub arbiter: bool,
    pub set_name: Option<String>,
    pub code: Option<i32>,
    pub errmsg: Option<String>,
}

fn is_command_not_found(f: &Fields) -> bool {
    f.ok != 1.0
        && (f.code == Some(COMMAND_NOT_FOUND)
            || f.errmsg
                .as_deref()
                .is_some_and(|m| m.contains("no such command") || m.contains("no such cmd")))
}

fn judge(check: &MongoCheck, f: &Fields) -> Observation {
    if f.ok != 1.0 {
        return Observation::down(
            DownReason::CheckError,
            format!(
                "hello failed: {} (code {})",
                f.errmsg.as_deref().unwrap_or("no errmsg"),
                f.code.unwrap_or(0)
            ),
        );
    }
    if let Some(want) = &check.replica_set {
        if f.set_name.as_deref() != Some(want.as_str()) {
            return Observation::down(
                DownReason::WrongRole,
                format!(
                    "member of replica set {:?}, expected {want}",
                    f.set_name.as_deref().unwrap_or("(none)")
                ),
            );
        }
    }
    let (primary, secondary) = (f.writable_primary, f.secondary && !f.writable_primary);
    let standby = |what: &str| {
        Observation::with(
            HealthStatus::STANDBY,
            None,
            Some(format!("{what}, and this pool wants another role")),
        )
    };
    match (check.role, primary, secondary) {
        (MongoRole::Primary | MongoRole::Any, true, _) => Observation::up(),
        (MongoRole::Secondary | MongoRole::Any, _, true) => Observation::up(),
        (MongoRole::Primary, _, true) => standby("secondary"),
        (MongoRole::Secondary, true, _) => standby("primary"),
        _ => Observation::down(
            DownReason::WrongRole,
            if f.arbiter {
                "arbiter".to_string()
            } else {
                "neither primary nor secondary".to_string()
            },
        ),
    }
}

/// OP_MSG with one body section: `{<name>: 1, $db: "admin"}`.
pub fn encode_command(request_id: i32, name: &str) -> Vec<u8> {
    let mut doc = Vec::with_capacity(48);
    doc.extend_from_slice(&[0; 4]);
    doc.push(0x10); // int32
    doc.extend_from_slice(name.as_bytes());
    doc.push(0);
    doc.extend_from_slice(&1i32.to_le_bytes());
    doc.push(0x02); // string
    doc.extend_from_slice(b"$db\0");
    doc.extend_from_slice(&6i32.to_le_bytes());
    doc.extend_from_slice(b"admin\0");
    doc.push(0);
    let doc_len = doc.len() as i32;
    doc[..4].copy_from_slice(&doc_len.to_le_bytes());

    let total = 16 + 4 + 1 + doc.len();
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&(total as i32).to_le_bytes());
    msg.extend_from_slice(&request_id.to_le_bytes());
    msg.extend_from_slice(&0i32.to_le_bytes());
    msg.extend_from_slice(&OP_MSG.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes()); // flagBits
    msg.push(0); // section kind 0: body
    msg.extend_from_slice(&doc);
    msg
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Reads the body section of an OP_MSG (the bytes after the 16-byte header).
pub fn parse_op_msg(body: &[u8]) -> Option<Fields> {
    let flags = u32::from_le_bytes(body.get(..4)?.try_into().ok()?);
    let checksum = if flags & 1 != 0 { 4 } else { 0 };
    let mut at = 4;
    while at < body.len() - checksum {
        let kind = *body.get(at)?;
        at += 1;
        let len = usize::try_from(i32_at(body, at)?).ok()?;
        if kind == 0 {
            return parse_document(body.get(at..at + len)?);
        }
        // Kind 1 (document sequence): skip it.
        at += len;
    }
    None
}

/// Top-level fields of a BSON document; other fields are skipped by their encoded size.
pub fn parse_document(doc: &[u8]) -> Option<Fields> {
    let len = usize::try_from(i32_at(doc, 0)?).ok()?;
    if len != doc.len() || len < 5 || doc[len - 1] != 0 {
        return None;
    }
    let mut f = Fields::default();
    let mut at = 4;
    while at < len - 1 {
        let kind = doc[at];
        at += 1;
        let name_end = at + doc.get(at..)?.iter().position(|b| *b == 0)?;
        let name = std::str::from_utf8(&doc[at..name_end]).ok()?;
        at = name_end + 1;
        let value = doc.get(at..len - 1)?;
        let size = match kind {
            0x01 => {
                let v = f64::from_le_bytes(value.get(..8)?.try_into().ok()?);
                set_number(&mut f, name, v);
                8
            }
            0x10 => {
                let v = i32::from_le_bytes(value.get(..4)?.try_into().ok()?);
                set_number(&mut f, name, f64::from(v));
                if name == "code" {
                    f.code = Some(v);
                }
                4
            }
            0x12 => {
                let v = i64::from_le_bytes(value.get(..8)?.try_into().ok()?);
                set_number(&mut f, name, v as f64);
                8
            }
            0x08 => {
                let v = *value.first()? != 0;
                match name {
                    "isWritablePrimary" | "ismaster" => f.writable_primary |= v,
                    "secondary" => f.secondary = v,
                    "arbiterOnly" => f.arbiter = v,
                    _ => {}
                }
                1
            }
            0x02 | 0x0D | 0x0E => {
                let n = usize::try_from(i32_at(value, 0)?).ok()?;
                if n == 0 {
                    return None;
                }
                let text = std::str::from_utf8(value.get(4..4 + n - 1)?).ok()?;
                match name {
                    "setName" => f.set_name = Some(text.to_string()),
                    "errmsg" => f.errmsg = Some(text.to_string()),
                    _ => {}
                }
                4 + n
            }
            0x03 | 0x04 | 0x0F => usize::try_from(i32_at(value, 0)?).ok()?,
            0x05 => 5 + usize::try_from(i32_at(value, 0)?).ok()?,
            0x06 | 0x0A | 0xFF | 0x7F => 0,
            0x07 => 12,
            0x09 | 0x11 => 8,
            0x13 => 16,
            0x0B => {
                let first = value.iter().position(|b| *b == 0)?;
                let second = value.get(first + 1..)?.iter().position(|b| *b == 0)?;
                first + second + 2
            }
            0x0C => 4 + usize::try_from(i32_at(value, 0)?).ok()? + 12,
            _ => return None,
        };
        if size > value.len() {
            return None;
        }
        at += size;
    }
    Some(f)
}

fn set_number(f: &mut Fields, name: &str, v: f64) {
    if name == "ok" {
        f.ok = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BSON document from (type, name, value bytes) elements.
    fn doc(elements: &[(u8, &str, Vec<u8>)]) -> Vec<u8> {
        let mut d = vec![0; 4];
        for (kind, name, value) in elements {
            d.push(*kind);
            d.extend_from_slice(name.as_bytes());
            d.push(0);
            d.extend_from_slice(value);
        }
        d.push(0);
        let n = d.len() as i32;
        d[..4].copy_from_slice(&n.to_le_bytes());
        d
    }

    fn string(s: &str) -> Vec<u8> {
        let mut v = ((s.len() + 1) as i32).to_le_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        v
    }

    #[test]
    fn command_round_trips_through_the_parser() {
        let msg = encode_command(9, "hello");
        assert_eq!(i32_at(&msg, 0), Some(msg.len() as i32));
        assert_eq!(i32_at(&msg, 12), Some(OP_MSG));
        let f = parse_op_msg(&msg[16..]).expect("parses");
        assert_eq!(f.ok, 0.0);
    }

    #[test]
    fn reads_a_secondary_reply_skipping_other_fields() {
        let hosts = doc(&[(0x02, "0", string("a:27017"))]);
        let d = doc(&[
            (0x04, "hosts", hosts),
            (0x08, "isWritablePrimary", vec![0]),
            (0x08, "secondary", vec![1]),
            (0x02, "setName", string("rs0")),
            (0x07, "electionId", vec![7; 12]),
            (0x09, "localTime", vec![0; 8]),
            (0x12, "maxWireVersion", 17i64.to_le_bytes().to_vec()),
            (0x01, "ok", 1f64.to_le_bytes().to_vec()),
        ]);
        let f = parse_document(&d).expect("parses");
        assert_eq!(f.ok, 1.0);
        assert!(f.secondary && !f.writable_primary);
        assert_eq!(f.set_name.as_deref(), Some("rs0"));
        let any = MongoCheck {
            role: MongoRole::Any,
            replica_set: Some("rs0".into()),
            tls: false,
        };
        assert_eq!(judge(&any, &f).status, HealthStatus::UP);
        let primary = MongoCheck {
            role: MongoRole::Primary,
            replica_set: None,
            tls: false,
        };
        assert_eq!(judge(&primary, &f).status, HealthStatus::STANDBY);
        let other_set = MongoCheck {
            role: MongoRole::Any,
            replica_set: Some("rs1".into()),
            tls: false,
        };
        assert_eq!(
            judge(&other_set, &f).status,
            HealthStatus::down(DownReason::WrongRole)
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(7);
        let valid = {
            let mut body = 0u32.to_le_bytes().to_vec();
            body.push(0);
            body.extend_from_slice(&doc(&[
                (0x08, "isWritablePrimary", vec![1]),
                (0x02, "setName", string("rs0")),
                (0x01, "ok", 1f64.to_le_bytes().to_vec()),
            ]));
            body
        };
        assert!(parse_op_msg(&valid).is_some_and(|f| f.writable_primary));
        for _ in 0..20_000 {
            let mut bytes = valid.clone();
            for _ in 0..rng.usize(1..4) {
                let i = rng.usize(..bytes.len());
                bytes[i] = rng.u8(..);
            }
            bytes.truncate(rng.usize(5..=bytes.len()));
            let _ = parse_op_msg(&bytes);
            let len = rng.usize(0..64);
            let noise: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            let _ = parse_document(&noise);
        }
    }

    #[test]
    fn command_not_found_and_malformed() {
        let d = doc(&[
            (0x01, "ok", 0f64.to_le_bytes().to_vec()),
            (0x02, "errmsg", string("no such command: 'hello'")),
            (0x10, "code", 59i32.to_le_bytes().to_vec()),
        ]);
        let f = parse_document(&d).expect("parses");
        assert!(is_command_not_found(&f));
        assert!(parse_document(&d[..d.len() - 1]).is_none(), "truncated");
        let mut bad = d.clone();
        bad[4] = 0x42;
        assert!(parse_document(&bad).is_none(), "unknown type");
        let mut long = 1000i32.to_le_bytes().to_vec();
        long.extend_from_slice(b"short\0");
        let lying = doc(&[(0x02, "errmsg", long)]);
        assert!(
            parse_document(&lying).is_none(),
            "string longer than the document"
        );
    }
}
