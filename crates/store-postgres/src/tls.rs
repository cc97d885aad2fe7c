//! TLS to PostgreSQL over rustls, the TLS stack the gateway already uses for upstreams (so no
//! second crypto library is built). The server's certificate is always verified, chain and host
//! name, against the platform's trust store and any certificates `sslrootcert` names; there is no
//! mode that encrypts without knowing whom to. Channel binding (SCRAM-SHA-256-PLUS) is not
//! offered: SCRAM without it still authenticates both ways, and the verified certificate already
//! rules out a server in the middle.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Makes a TLS connection for each new connection to the database.
#[derive(Clone)]
pub(crate) struct Rustls {
    config: Arc<rustls::ClientConfig>,
}

impl Rustls {
    /// Trusting the platform's store and the certificates of the PEM file `root_file`, if any.
    pub(crate) fn new(root_file: Option<&Path>) -> Result<Rustls, String> {
        let extra = match root_file {
            None => Vec::new(),
            Some(path) => {
                use rustls::pki_types::pem::PemObject;
                let certificates = CertificateDer::pem_file_iter(path)
                    .map_err(|error| format!("sslrootcert {}: {error}", path.display()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|error| {
                        format!("sslrootcert {} is not PEM: {error}", path.display())
                    })?;
                if certificates.is_empty() {
                    return Err(format!("sslrootcert {} has no certificate", path.display()));
                }
                certificates
            }
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            rustls_platform_verifier::Verifier::new_with_extra_roots(extra, Arc::clone(&provider))
                .map_err(|error| format!("TLS: {error}"))?;
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| format!("TLS: {error}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(Rustls {
            config: Arc::new(config),
        })
    }
}

impl<S> MakeTlsConnect<S> for Rustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type TlsConnect = Connect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, host: &str) -> Result<Connect, Self::Error> {
        Ok(Connect {
            connector: tokio_rustls::TlsConnector::from(Arc::clone(&self.config)),
            name: ServerName::try_from(host.to_string())?,
        })
    }
}

/// One connection's handshake.
pub(crate) struct Connect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for Connect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = Stream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            self.connector
                .connect(self.name, stream)
                .await
                .map(|stream| Stream(Box::new(stream)))
        })
    }
}

/// An encrypted connection.
pub(crate) struct Stream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(context, buffer)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(context, bytes)
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(context)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(context, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for Stream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}
