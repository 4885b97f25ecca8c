//! TLS fixtures: one test CA (rcgen) issuing server certificates, TLS backends (rustls) that
//! greet with their name and echo, verifying clients, and a writer that trickles bytes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate and its key, as DER (for rustls) and PEM (for files).
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key_der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// A test certificate authority.
pub struct Pki {
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    pub ca_pem: String,
}

impl Pki {
    pub fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Switchyard test CA");
        let ca_key = KeyPair::generate().expect("key");
        let ca_cert = params.self_signed(&ca_key).expect("self-signed CA");
        let ca_pem = ca_cert.pem();
        Pki {
            ca_cert,
            ca_key,
            ca_pem,
        }
    }

    /// A server certificate for `name`, signed by this CA.
    pub fn issue(&self, name: &str) -> Issued {
        let mut params = CertificateParams::new(vec![name.to_string()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign");
        Issued {
            chain: vec![cert.der().clone()],
            key_der: key.serialize_der(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn write_ca(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).expect("write CA");
        path
    }

    fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_cert.der().clone()).expect("CA root");
        roots
    }

    /// A client that verifies the chain against this CA only.
    pub fn client(&self, alpn: &[&[u8]], send_sni: bool) -> TlsConnector {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(self.roots())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.enable_sni = send_sni;
        TlsConnector::from(Arc::new(config))
    }

    /// A client that sends the name it connects with as SNI but accepts only a chain from
    /// this CA for `cert_name`: it reaches, and proves it reached, the server for
    /// `cert_name` when it asks for another name.
    pub fn client_expecting(&self, cert_name: &str) -> TlsConnector {
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(self.roots()), provider())
            .build()
            .expect("verifier");
        let verifier = ExpectName {
            inner,
            name: ServerName::try_from(cert_name.to_string()).expect("server name"),
        };
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

/// Verifies the server's chain for a fixed name instead of the one the client asked for.
#[derive(Debug)]
struct ExpectName {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for ExpectName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _asked_for: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Opens TLS over `stream`, verifying the certificate for `name`.
pub async fn tls_connect<S: AsyncRead + AsyncWrite + Unpin>(
    connector: &TlsConnector,
    name: &str,
    stream: S,
) -> io::Result<TlsStream<S>> {
    let server_name = ServerName::try_from(name.to_string()).expect("server name");
    connector.connect(server_name, stream).await
}

/// A TLS server that greets each client with `name\n` after the handshake, then echoes.
pub struct TlsBackend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl TlsBackend {
    pub async fn start(name: &str, issued: &Issued) -> TlsBackend {
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(issued.chain.clone(), issued.key())
            .expect("server config");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let greeting = format!("{name}\n");
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (mut r, mut w) = tokio::io::split(tls);
                    if w.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        TlsBackend { addr, task }
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads the greeting line of a TLS stream.
pub async fn read_greeting<S: AsyncRead + Unpin>(reader: &mut BufReader<S>) -> String {
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(30), reader.read_line(&mut line))
        .await
        .expect("greeting in time")
        .expect("read greeting");
    line.trim_end().to_string()
}

/// A TCP stream whose first `slow` bytes are written one per write call, `gap` apart: a
/// ClientHello split into many tiny TCP segments.
pub struct Trickle {
    pub inner: TcpStream,
    /// Single-byte writes made so far.
    pub tiny_writes: usize,
    slow: usize,
    gap: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Trickle {
    pub fn new(inner: TcpStream, slow: usize, gap: Duration) -> Trickle {
        inner.set_nodelay(true).expect("nodelay");
        Trickle {
            inner,
            tiny_writes: 0,
            slow,
            gap,
            sleep: None,
        }
    }
}

impl AsyncRead for Trickle {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Trickle {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.slow == 0 {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        let n = match Pin::new(&mut this.inner).poll_write(cx, &buf[..1.min(buf.len())]) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        this.slow -= n;
        this.tiny_writes += 1;
        this.sleep = Some(Box::pin(tokio::time::sleep(this.gap)));
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
