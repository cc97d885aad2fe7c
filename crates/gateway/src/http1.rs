//! A lean HTTP/1.1 client for upstream model servers.
//!
//! Why not reqwest or hyper's client: every call through them goes from the request's task to a
//! connection task over a channel and back (two task wake-ups, a header map, a URL), and on this
//! gateway's hot path that was more than the whole of an nginx proxy's work for a call (measured:
//! docs/benchmarks.md, "Gateway"). Here the request's own task owns the connection for the
//! call: one write for the request, reads into one buffer, `httparse` for the head, and the body
//! framed by `Content-Length` or chunked encoding, decoded in place. Connections are kept alive
//! in a small LIFO pool; TLS (for `https://` upstreams) is rustls.
//!
//! What it does not do, on purpose: redirects, compression, HTTP/2, proxies, cookies. An
//! OpenAI-compatible upstream needs none of them.

use crate::limits::{
    UPSTREAM_CHUNK_LINE_MAX, UPSTREAM_HEAD_BYTES_MAX, UPSTREAM_HEADERS_MAX, UPSTREAM_IDLE_MAX,
};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{StatusCode, Uri};
use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// How much the read buffer grows by when it needs room.
const READ_CHUNK: usize = 16 * 1024;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The base URL cannot be used.
    #[error("{0}")]
    Config(String),
    /// Connecting (TCP or TLS) failed.
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    /// Reading or writing failed, or the connection closed early.
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    /// The response is not HTTP/1.x as we accept it.
    #[error("bad response: {0}")]
    Protocol(&'static str),
    /// The body is larger than the caller allows.
    #[error("the response is over {0} bytes")]
    TooLarge(usize),
}

/// Where the upstream is, worked out once from its base URL.
struct Target {
    host: String,
    port: u16,
    /// `Host:` header value.
    authority: String,
    /// The base URL's path, without a trailing slash (`/v1`).
    base_path: String,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
}

/// A keep-alive client for one upstream.
pub struct Client {
    target: Target,
    connect_timeout: Duration,
    /// Idle connections, most recently used last.
    idle: Mutex<Vec<Connection>>,
    idle_max: usize,
}

/// What TLS may trust.
#[derive(Debug, Clone, Default)]
pub enum Roots {
    /// The platform's trust store.
    #[default]
    Platform,
    /// The platform's trust store and these extra certificates (a private CA, say).
    PlatformAnd(Vec<rustls::pki_types::CertificateDer<'static>>),
}

impl Roots {
    /// The platform's trust store and the certificates of a PEM file.
    pub fn platform_and_pem_file(path: &std::path::Path) -> Result<Roots, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let certificates = CertificateDer::pem_file_iter(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("{} is not PEM: {error}", path.display()))?;
        if certificates.is_empty() {
            return Err(format!("{} has no certificate", path.display()));
        }
        Ok(Roots::PlatformAnd(certificates))
    }
}

impl Client {
    /// A client for `base_url` (`http://host:port/path` or `https://…`), keeping up to
    /// `idle_max` idle connections.
    pub fn new(
        base_url: &str,
        connect_timeout: Duration,
        idle_max: usize,
        roots: Roots,
    ) -> Result<Client, Error> {
        let uri: Uri = base_url
            .parse()
            .map_err(|error| Error::Config(format!("{base_url:?} is not a URL: {error}")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(Error::Config(format!(
                    "{base_url:?} must start with http:// or https://"
                )));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| Error::Config(format!("{base_url:?} has no host")))?;
        if authority.as_str().contains('@') {
            return Err(Error::Config(format!(
                "{base_url:?}: put credentials in api_key_env, not in the URL"
            )));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        if uri.query().is_some() {
            return Err(Error::Config(format!("{base_url:?} must not have a query")));
        }
        let tls = if https {
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let verifier = match roots {
                Roots::Platform => rustls_platform_verifier::Verifier::new(Arc::clone(&provider)),
                Roots::PlatformAnd(extra) => {
                    rustls_platform_verifier::Verifier::new_with_extra_roots(
                        extra,
                        Arc::clone(&provider),
                    )
                }
            }
            .map_err(|error| Error::Config(format!("TLS: {error}")))?;
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|error| Error::Config(format!("TLS: {error}")))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| Error::Config(format!("{host:?} is not a TLS server name")))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Client {
            target: Target {
                authority: authority.as_str().to_string(),
                host,
                port,
                base_path: uri.path().trim_end_matches('/').to_string(),
                tls,
            },
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            idle_max,
        })
    }

    /// Writes the head of a `POST {base_path}{path}` with a JSON body of `length` bytes.
    /// `extra_headers` are whole lines, each ending in CRLF.
    pub fn request_head(&self, path: &str, extra_headers: &str, length: usize) -> Vec<u8> {
        let mut head = Vec::with_capacity(256 + extra_headers.len());
        head.extend_from_slice(b"POST ");
        head.extend_from_slice(self.target.base_path.as_bytes());
        head.extend_from_slice(path.as_bytes());
        head.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        head.extend_from_slice(self.target.authority.as_bytes());
        head.extend_from_slice(
            b"\r\nUser-Agent: stipend\r\nContent-Type: application/json\r\nContent-Length: ",
        );
        head.extend_from_slice(length.to_string().as_bytes());
        head.extend_from_slice(b"\r\n");
        head.extend_from_slice(extra_headers.as_bytes());
        head.extend_from_slice(b"\r\n");
        head
    }

    /// Sends `head` and `body` and reads the response head. A reused connection the server had
    /// closed (it answered nothing at all) is retried once on a new one; nothing else is retried.
    pub async fn send(self: &Arc<Self>, head: &[u8], body: &[u8]) -> Result<Response, Error> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            // The retry always takes a new connection, never another pooled one.
            let pooled = if attempt == 1 { self.checkout() } else { None };
            let (mut connection, reused) = match pooled {
                Some(connection) => (connection, true),
                None => (self.connect().await?, false),
            };
            match connection.exchange(head, body).await {
                Ok(head) => {
                    return Ok(Response {
                        status: head.status,
                        body: Body {
                            client: Arc::clone(self),
                            connection: Some(connection),
                            framing: head.framing,
                            keep_alive: head.keep_alive,
                        },
                    });
                }
                Err(Failure { error, answered }) => {
                    if reused && !answered && attempt == 1 {
                        tracing::debug!(%error, "a kept-alive upstream connection was closed; retrying on a new one");
                        continue;
                    }
                    return Err(error);
                }
            }
        }
    }

    fn checkout(&self) -> Option<Connection> {
        let mut idle = self.idle.lock();
        while let Some(mut connection) = idle.pop() {
            if connection.idle_since.elapsed() < UPSTREAM_IDLE_MAX && connection.looks_open() {
                return Some(connection);
            }
        }
        None
    }

    fn checkin(&self, mut connection: Connection) {
        connection.idle_since = Instant::now();
        let mut idle = self.idle.lock();
        if idle.len() < self.idle_max {
            idle.push(connection);
        }
    }

    async fn connect(&self) -> Result<Connection, Error> {
        let target = &self.target;
        let connect = async {
            let stream = TcpStream::connect((target.host.as_str(), target.port)).await?;
            stream.set_nodelay(true)?;
            Ok::<_, io::Error>(match &target.tls {
                None => Io::Plain(stream),
                Some((connector, name)) => {
                    Io::Tls(Box::new(connector.connect(name.clone(), stream).await?))
                }
            })
        };
        let io = match tokio::time::timeout(self.connect_timeout, connect).await {
            Err(_) => return Err(Error::Connect(io::ErrorKind::TimedOut.into())),
            Ok(Err(error)) => return Err(Error::Connect(error)),
            Ok(Ok(io)) => io,
        };
        Ok(Connection {
            io,
            buffer: BytesMut::with_capacity(READ_CHUNK),
            idle_since: Instant::now(),
        })
    }

    /// Idle connections held (for tests).
    pub fn idle_connections(&self) -> usize {
        self.idle.lock().len()
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Client")
            .field("authority", &self.target.authority)
            .field("base_path", &self.target.base_path)
            .field("tls", &self.target.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// A response: its status, and its body to read.
pub struct Response {
    /// The status code.
    pub status: StatusCode,
    /// The body.
    pub body: Body,
}

/// A response body. Read to its end, its connection goes back to the pool; dropped before, the
/// connection is closed (which tells the upstream to stop generating).
pub struct Body {
    client: Arc<Client>,
    connection: Option<Connection>,
    framing: Framing,
    keep_alive: bool,
}

impl Body {
    /// The next piece of the body, or `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, Error> {
        let Some(connection) = self.connection.as_mut() else {
            return Ok(None);
        };
        let piece = connection.next_piece(&mut self.framing).await?;
        if piece.is_none() {
            self.finish();
        }
        Ok(piece)
    }

    /// The whole body, refused beyond `limit` bytes.
    pub async fn collect(mut self, limit: usize) -> Result<Bytes, Error> {
        // Most answers arrive whole with their head: hand out that piece without a copy.
        let Some(first) = self.chunk().await? else {
            return Ok(Bytes::new());
        };
        if first.len() > limit {
            return Err(Error::TooLarge(limit));
        }
        let Some(second) = self.chunk().await? else {
            return Ok(first);
        };
        let mut whole = BytesMut::from(&first[..]);
        let mut next = Some(second);
        while let Some(piece) = next {
            if whole.len() + piece.len() > limit {
                return Err(Error::TooLarge(limit));
            }
            whole.extend_from_slice(&piece);
            next = self.chunk().await?;
        }
        Ok(whole.freeze())
    }

    fn finish(&mut self) {
        if let Some(connection) = self.connection.take()
            && self.keep_alive
            && matches!(self.framing, Framing::Done)
            // Bytes beyond the response: the connection is out of step; do not reuse it.
            && connection.buffer.is_empty()
        {
            self.client.checkin(connection);
        }
    }
}

/// How the body's end is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// `Content-Length`: this many bytes remain.
    Length(u64),
    /// Chunked: at a size line.
    ChunkSize,
    /// Chunked: this many bytes of the current chunk remain.
    ChunkData(u64),
    /// Chunked: the CRLF after a chunk's data.
    ChunkEnd,
    /// Chunked: after the last chunk, reading trailer lines.
    Trailers,
    /// Until the server closes the connection.
    UntilClose,
    /// Read to the end.
    Done,
}

struct ResponseHead {
    status: StatusCode,
    framing: Framing,
    keep_alive: bool,
}

struct Failure {
    error: Error,
    /// Whether any byte of a response arrived.
    answered: bool,
}

#[derive(Debug)]
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

#[derive(Debug)]
struct Connection {
    io: Io,
    /// Bytes read and not yet consumed.
    buffer: BytesMut,
    idle_since: Instant,
}

impl Connection {
    /// Whether an idle connection can still be used: the server has neither closed it nor sent
    /// anything unasked. Costs no system call unless the socket was marked readable.
    fn looks_open(&mut self) -> bool {
        match &self.io {
            Io::Plain(stream) => {
                let mut probe = [0u8; 1];
                matches!(stream.try_read(&mut probe), Err(error) if error.kind() == io::ErrorKind::WouldBlock)
            }
            // Decrypting to check would consume TLS records; the retry in `send` covers it.
            Io::Tls(_) => true,
        }
    }

    async fn exchange(&mut self, head: &[u8], body: &[u8]) -> Result<ResponseHead, Failure> {
        let unanswered = |error: Error| Failure {
            error,
            answered: false,
        };
        if body.len() <= 16 * 1024 {
            let mut request = Vec::with_capacity(head.len() + body.len());
            request.extend_from_slice(head);
            request.extend_from_slice(body);
            self.io
                .write_all(&request)
                .await
                .map_err(|error| unanswered(error.into()))?;
        } else {
            self.io
                .write_all(head)
                .await
                .map_err(|error| unanswered(error.into()))?;
            self.io
                .write_all(body)
                .await
                .map_err(|error| unanswered(error.into()))?;
        }
        self.io
            .flush()
            .await
            .map_err(|error| unanswered(error.into()))?;
        self.buffer.clear();
        loop {
            match self.read_head() {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(error) => {
                    return Err(Failure {
                        error,
                        answered: true,
                    });
                }
            }
            let answered = !self.buffer.is_empty();
            match self.fill().await {
                Ok(0) => {
                    return Err(Failure {
                        error: Error::Io(io::ErrorKind::UnexpectedEof.into()),
                        answered,
                    });
                }
                Ok(_) => {}
                Err(error) => {
                    return Err(Failure {
                        error: error.into(),
                        answered,
                    });
                }
            }
        }
    }

    /// Reads more into the buffer; 0 means the server closed the connection.
    async fn fill(&mut self) -> io::Result<usize> {
        self.buffer.reserve(READ_CHUNK);
        self.io.read_buf(&mut self.buffer).await
    }

    /// Parses a response head from the buffer, if a whole one is there; skips 1xx responses.
    fn read_head(&mut self) -> Result<Option<ResponseHead>, Error> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; UPSTREAM_HEADERS_MAX];
            let mut response = httparse::Response::new(&mut headers);
            let length = match response.parse(&self.buffer) {
                // The limit holds however the head arrived: in pieces, or whole in one read.
                Ok(httparse::Status::Complete(length)) if length > UPSTREAM_HEAD_BYTES_MAX => {
                    return Err(Error::Protocol("the response head is too large"));
                }
                Ok(httparse::Status::Complete(length)) => length,
                Ok(httparse::Status::Partial) if self.buffer.len() > UPSTREAM_HEAD_BYTES_MAX => {
                    return Err(Error::Protocol("the response head is too large"));
                }
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(_) => return Err(Error::Protocol("not an HTTP/1.x response")),
            };
            let code = response.code.unwrap_or(0);
            let status = StatusCode::from_u16(code)
                .map_err(|_| Error::Protocol("the status code is out of range"))?;
            if status.is_informational() {
                if code == 101 {
                    return Err(Error::Protocol("the upstream switched protocols"));
                }
                self.buffer.advance(length);
                continue;
            }
            let mut keep_alive = response.version == Some(1);
            let mut chunked = false;
            let mut content_length: Option<u64> = None;
            for header in response.headers.iter() {
                if header.name.eq_ignore_ascii_case("transfer-encoding") {
                    // Chunked must be the last coding; anything else we cannot frame.
                    let value = std::str::from_utf8(header.value).unwrap_or("");
                    let last = value.rsplit(',').next().unwrap_or("").trim();
                    if !last.eq_ignore_ascii_case("chunked") {
                        return Err(Error::Protocol("an unsupported transfer coding"));
                    }
                    chunked = true;
                } else if header.name.eq_ignore_ascii_case("content-length") {
                    let value = std::str::from_utf8(header.value)
                        .ok()
                        .and_then(|value| value.trim().parse::<u64>().ok())
                        .ok_or(Error::Protocol("a bad Content-Length"))?;
                    if content_length.is_some_and(|seen| seen != value) {
                        return Err(Error::Protocol("conflicting Content-Length headers"));
                    }
                    content_length = Some(value);
                } else if header.name.eq_ignore_ascii_case("connection") {
                    let value = std::str::from_utf8(header.value).unwrap_or("");
                    if value
                        .split(',')
                        .any(|token| token.trim().eq_ignore_ascii_case("close"))
                    {
                        keep_alive = false;
                    }
                }
            }
            let no_body = code == 204 || code == 304;
            let framing = if no_body {
                Framing::Done
            } else if chunked {
                // Both headers: a smuggling shape; chunked wins and the connection is not reused.
                if content_length.is_some() {
                    keep_alive = false;
                }
                Framing::ChunkSize
            } else if let Some(length) = content_length {
                if length == 0 {
                    Framing::Done
                } else {
                    Framing::Length(length)
                }
            } else {
                keep_alive = false;
                Framing::UntilClose
            };
            self.buffer.advance(length);
            return Ok(Some(ResponseHead {
                status,
                framing,
                keep_alive,
            }));
        }
    }

    /// The next piece of body under `framing`, or `None` at its end.
    async fn next_piece(&mut self, framing: &mut Framing) -> Result<Option<Bytes>, Error> {
        loop {
            match *framing {
                Framing::Done => return Ok(None),
                Framing::Length(remaining) | Framing::ChunkData(remaining) => {
                    if self.buffer.is_empty() && self.fill().await? == 0 {
                        return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
                    }
                    let take = (self.buffer.len() as u64).min(remaining) as usize;
                    let piece = self.buffer.split_to(take).freeze();
                    let left = remaining - take as u64;
                    *framing = match *framing {
                        Framing::Length(_) if left == 0 => Framing::Done,
                        Framing::Length(_) => Framing::Length(left),
                        _ if left == 0 => Framing::ChunkEnd,
                        _ => Framing::ChunkData(left),
                    };
                    return Ok(Some(piece));
                }
                Framing::UntilClose => {
                    if self.buffer.is_empty() && self.fill().await? == 0 {
                        *framing = Framing::Done;
                        return Ok(None);
                    }
                    let piece = self.buffer.split().freeze();
                    return Ok(Some(piece));
                }
                Framing::ChunkSize => {
                    let line = self.line().await?;
                    let digits = line.split(|byte| *byte == b';').next().unwrap_or(&[]);
                    let digits = std::str::from_utf8(digits)
                        .map_err(|_| Error::Protocol("a bad chunk size"))?
                        .trim();
                    let size = u64::from_str_radix(digits, 16)
                        .map_err(|_| Error::Protocol("a bad chunk size"))?;
                    *framing = if size == 0 {
                        Framing::Trailers
                    } else {
                        Framing::ChunkData(size)
                    };
                }
                Framing::ChunkEnd => {
                    if !self.line().await?.is_empty() {
                        return Err(Error::Protocol("a chunk longer than its size"));
                    }
                    *framing = Framing::ChunkSize;
                }
                Framing::Trailers => {
                    // Trailer lines until an empty one; their content is not needed.
                    let mut trailer_bytes = 0;
                    loop {
                        let line = self.line().await?;
                        if line.is_empty() {
                            break;
                        }
                        trailer_bytes += line.len();
                        if trailer_bytes > UPSTREAM_HEAD_BYTES_MAX {
                            return Err(Error::Protocol("the trailers are too large"));
                        }
                    }
                    *framing = Framing::Done;
                }
            }
        }
    }

    /// The next CRLF-terminated line, without its CRLF.
    async fn line(&mut self) -> Result<Bytes, Error> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|pair| pair == b"\r\n") {
                let line = self.buffer.split_to(end).freeze();
                self.buffer.advance(2);
                return Ok(line);
            }
            if self.buffer.len() > UPSTREAM_CHUNK_LINE_MAX {
                return Err(Error::Protocol("a chunk line is too long"));
            }
            if self.fill().await? == 0 {
                return Err(Error::Io(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Io::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::AsyncBufReadExt;
    use tokio::net::TcpListener;

    use super::*;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}";

    /// A scripted server: each accepted connection runs `script` with its number (from 0).
    /// Returns the base URL and the count of accepted connections.
    async fn server<F, Fut>(script: F) -> (String, Arc<AtomicUsize>)
    where
        F: Fn(usize, tokio::io::BufReader<TcpStream>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let script = Arc::new(script);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let number = counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(script(number, tokio::io::BufReader::new(stream)));
            }
        });
        (format!("http://{address}/v1"), accepted)
    }

    /// Reads one request (head and Content-Length body); `None` if the client closed first.
    async fn read_request(reader: &mut tokio::io::BufReader<TcpStream>) -> Option<String> {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("Content-Length: "))
            .map_or(0, |value| value.trim().parse::<usize>().unwrap());
        let mut body = vec![0; length];
        reader.read_exact(&mut body).await.ok()?;
        Some(head + std::str::from_utf8(&body).unwrap())
    }

    fn client(base_url: &str) -> Arc<Client> {
        Arc::new(Client::new(base_url, Duration::from_secs(5), 8, Roots::Platform).unwrap())
    }

    async fn call(client: &Arc<Client>) -> Result<(StatusCode, Bytes), Error> {
        let body = br#"{"model":"m"}"#;
        let head = client.request_head("/chat/completions", "X-Test: 1\r\n", body.len());
        let response = client.send(&head, body).await?;
        let status = response.status;
        Ok((status, response.body.collect(1 << 20).await?))
    }

    #[tokio::test]
    async fn calls_reuse_one_kept_alive_connection_and_send_what_was_asked() {
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        let (url, accepted) = server(move |_, mut reader| {
            let seen_tx = seen_tx.clone();
            async move {
                while let Some(request) = read_request(&mut reader).await {
                    seen_tx.send(request).unwrap();
                    reader.get_mut().write_all(OK).await.unwrap();
                }
            }
        })
        .await;
        let client = client(&url);
        for _ in 0..3 {
            let (status, body) = call(&client).await.unwrap();
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], b"{\"ok\":true}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(client.idle_connections(), 1);
        let request = seen.recv().await.unwrap();
        assert!(
            request.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains(&format!("Host: {}\r\n", &url[7..url.len() - 3])));
        assert!(request.contains("X-Test: 1\r\n"));
        assert!(request.ends_with("\r\n\r\n{\"model\":\"m\"}"), "{request}");
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_however_the_bytes_arrive() {
        let response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n";
        let (url, accepted) = server(move |_, mut reader| async move {
            while read_request(&mut reader).await.is_some() {
                // One byte per write: every boundary falls somewhere awkward.
                for byte in response {
                    reader.get_mut().write_all(&[*byte]).await.unwrap();
                    reader.get_mut().flush().await.unwrap();
                }
            }
        })
        .await;
        let client = client(&url);
        for _ in 0..2 {
            let (_, body) = call(&client).await.unwrap();
            assert_eq!(&body[..], b"hello 0123456789");
        }
        // Read to its end, a chunked answer leaves its connection reusable.
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_framed_by_close_is_read_to_the_end_and_the_connection_not_kept() {
        let (url, accepted) = server(move |_, mut reader| async move {
            read_request(&mut reader).await;
            reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
                .await
                .unwrap();
        })
        .await;
        let client = client(&url);
        for _ in 0..2 {
            let (_, body) = call(&client).await.unwrap();
            assert_eq!(&body[..], b"until the end");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(client.idle_connections(), 0);
    }

    #[tokio::test]
    async fn connection_close_is_honoured() {
        let (url, accepted) = server(move |_, mut reader| async move {
            while read_request(&mut reader).await.is_some() {
                reader
                    .get_mut()
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                    )
                    .await
                    .unwrap();
            }
        })
        .await;
        let client = client(&url);
        call(&client).await.unwrap();
        call(&client).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_kept_alive_connection_closed_unanswered_is_retried_once_on_a_new_one() {
        let (url, accepted) = server(move |number, mut reader| async move {
            read_request(&mut reader).await;
            if number == 0 {
                reader.get_mut().write_all(OK).await.unwrap();
                // The second request arrives on this connection and is dropped unanswered, as
                // a server closing an idle connection at that moment would.
                read_request(&mut reader).await;
                return;
            }
            reader.get_mut().write_all(OK).await.unwrap();
        })
        .await;
        let client = client(&url);
        call(&client).await.unwrap();
        let (status, _) = call(&client).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_server_closed_is_not_reused() {
        let (url, accepted) = server(move |_, mut reader| async move {
            read_request(&mut reader).await;
            reader.get_mut().write_all(OK).await.unwrap();
            // A short keep-alive timeout: the server closes the idle connection.
            tokio::time::sleep(Duration::from_millis(20)).await;
        })
        .await;
        let client = client(&url);
        call(&client).await.unwrap();
        assert_eq!(client.idle_connections(), 1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, _) = call(&client).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_new_connection_closed_unanswered_is_an_error_not_a_retry() {
        let (url, accepted) = server(move |_, mut reader| async move {
            read_request(&mut reader).await;
        })
        .await;
        let client = client(&url);
        assert!(matches!(call(&client).await, Err(Error::Io(_))));
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn informational_responses_are_skipped() {
        let (url, _) = server(move |_, mut reader| async move {
            read_request(&mut reader).await;
            let mut answer = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
            answer.extend_from_slice(OK);
            reader.get_mut().write_all(&answer).await.unwrap();
        })
        .await;
        let (status, body) = call(&client(&url)).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"{\"ok\":true}");
    }

    #[tokio::test]
    async fn malformed_and_oversized_responses_are_errors() {
        let cases: Vec<Vec<u8>> = vec![
            b"SMTP ready\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab".to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n".to_vec(),
            [
                b"HTTP/1.1 200 OK\r\n".to_vec(),
                b"X: ".to_vec(),
                vec![b'a'; UPSTREAM_HEAD_BYTES_MAX + 10],
            ]
            .concat(),
            // A body that ends before its Content-Length.
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec(),
        ];
        for answer in cases {
            let shown = String::from_utf8_lossy(&answer[..answer.len().min(60)]).to_string();
            let (url, _) = server(move |_, mut reader| {
                let answer = answer.clone();
                async move {
                    read_request(&mut reader).await;
                    let _ = reader.get_mut().write_all(&answer).await;
                }
            })
            .await;
            let result = call(&client(&url)).await;
            assert!(result.is_err(), "accepted {shown:?}: {result:?}");
        }
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_refused() {
        let (url, _) = server(move |_, mut reader| async move {
            read_request(&mut reader).await;
            let mut answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n".to_vec();
            answer.extend(std::iter::repeat_n(b'x', 5000));
            reader.get_mut().write_all(&answer).await.unwrap();
        })
        .await;
        let client = client(&url);
        let body = b"{}";
        let head = client.request_head("/completions", "", body.len());
        let response = client.send(&head, body).await.unwrap();
        assert!(matches!(
            response.body.collect(4096).await,
            Err(Error::TooLarge(4096))
        ));
    }

    #[tokio::test]
    async fn dropping_a_body_half_read_closes_its_connection() {
        let (closed_tx, closed) = tokio::sync::oneshot::channel();
        let closed_tx = Arc::new(Mutex::new(Some(closed_tx)));
        let (url, _) = server(move |_, mut reader| {
            let closed_tx = Arc::clone(&closed_tx);
            async move {
                read_request(&mut reader).await;
                let stream = reader.get_mut();
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
                    .await
                    .unwrap();
                // The client reads one chunk and leaves: this read sees the connection end.
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
                if let Some(closed_tx) = closed_tx.lock().take() {
                    let _ = closed_tx.send(());
                }
            }
        })
        .await;
        let client = client(&url);
        let head = client.request_head("/chat/completions", "", 2);
        let mut response = client.send(&head, b"{}").await.unwrap();
        assert_eq!(&response.body.chunk().await.unwrap().unwrap()[..], b"abc");
        drop(response);
        tokio::time::timeout(Duration::from_secs(5), closed)
            .await
            .expect("the upstream saw the connection close")
            .unwrap();
        assert_eq!(client.idle_connections(), 0);
    }

    #[test]
    fn base_urls_are_checked() {
        for bad in [
            "ftp://host/v1",
            "127.0.0.1:9000/v1",
            "http://user:secret@host/v1",
            "http://host/v1?x=1",
            "not a url",
        ] {
            assert!(
                Client::new(bad, Duration::from_secs(1), 1, Roots::Platform).is_err(),
                "{bad}"
            );
        }
        let client = Client::new(
            "https://[::1]:8443/api/v1/",
            Duration::from_secs(1),
            1,
            Roots::Platform,
        )
        .unwrap();
        assert_eq!(client.target.host, "::1");
        assert_eq!(client.target.port, 8443);
        assert_eq!(client.target.base_path, "/api/v1");
        let head = String::from_utf8(client.request_head("/completions", "", 7)).unwrap();
        assert!(head.starts_with("POST /api/v1/completions HTTP/1.1\r\nHost: [::1]:8443\r\n"));
        assert!(head.ends_with("Content-Length: 7\r\n\r\n"));
    }

    /// A TLS server with the test certificate for localhost (signed by `tests/data/ca.pem`).
    async fn tls_server() -> String {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let data = stipend_testkit::repo_path("crates/gateway/tests/data");
        let certificates = CertificateDer::pem_file_iter(data.join("localhost.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(data.join("localhost.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certificates, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let mut reader = tokio::io::BufReader::new(stream);
                    let mut line = String::new();
                    // Read the head and the two-byte body, then answer twice on one connection.
                    for _ in 0..2 {
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                        }
                        let mut body = [0u8; 2];
                        reader.read_exact(&mut body).await.unwrap();
                        reader.get_mut().write_all(OK).await.unwrap();
                        reader.get_mut().flush().await.unwrap();
                    }
                });
            }
        });
        format!("https://localhost:{port}/v1")
    }

    #[tokio::test]
    async fn https_upstreams_are_verified_against_the_trusted_roots() {
        let url = tls_server().await;
        let ca = stipend_testkit::repo_path("crates/gateway/tests/data/ca.pem");
        let trusted = Arc::new(
            Client::new(
                &url,
                Duration::from_secs(5),
                4,
                Roots::platform_and_pem_file(&ca).unwrap(),
            )
            .unwrap(),
        );
        for _ in 0..2 {
            let head = trusted.request_head("/chat/completions", "", 2);
            let response = trusted.send(&head, b"{}").await.unwrap();
            assert_eq!(response.status, StatusCode::OK);
            assert_eq!(
                &response.body.collect(1024).await.unwrap()[..],
                b"{\"ok\":true}"
            );
        }
        assert_eq!(trusted.idle_connections(), 1);
        // Without the test CA, the same server is refused.
        let untrusted =
            Arc::new(Client::new(&url, Duration::from_secs(5), 4, Roots::Platform).unwrap());
        let head = untrusted.request_head("/chat/completions", "", 2);
        assert!(matches!(
            untrusted.send(&head, b"{}").await,
            Err(Error::Connect(_))
        ));
        assert!(Roots::platform_and_pem_file(std::path::Path::new("/nonexistent.pem")).is_err());
    }
}
