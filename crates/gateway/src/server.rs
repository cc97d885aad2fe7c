//! Serving the API over HTTP/1.1, with a limit on how long a client may take.
//!
//! `axum::serve` sets no timer on its connections, so hyper's header timeout never runs there: a
//! client that opens a connection and sends half a request head, or nothing at all, or keeps an
//! idle connection, held it (a task, its buffers, a file descriptor) for as long as it liked.
//! Slowly enough, a few thousand of them exhaust the server's descriptors. Here every connection
//! has a timer, and hyper closes it when a request head (the first one, or the next one on a
//! kept-alive connection) has not arrived within `head_timeout`. The body's own time limit is
//! [`crate::GatewayOptions::body_read_timeout`], applied where the body is read.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// How long accepting pauses after an error that is not one connection's (out of descriptors,
/// say), so that the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting, lets every
/// connection finish the request it is on (its next one is not read), and returns when all
/// have ended. Each accepted socket has `TCP_NODELAY` set: without it, each small chunk of a
/// stream after the first waited for the client's delayed ACK (about 40 ms).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    head_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = pin!(shutdown);
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) if is_one_connections(&error) => continue,
                Err(error) => {
                    tracing::warn!(%error, "accepting connections failed; pausing");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
            // Ended connections are collected as they go, so the set holds live ones only.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on a connection");
        }
        let service = TowerToHyperService::new(router.clone());
        let mut stop = stop_rx.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout);
            let mut connection = pin!(builder.serve_connection(TokioIo::new(stream), service));
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(error) = ended {
                        tracing::debug!(%error, "a client connection ended with an error");
                    }
                }
                _ = async { stop.wait_for(|stop| *stop).await.map(|_| ()) } => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while connections.join_next().await.is_some() {}
}

/// Whether an accept error concerns only the connection being accepted (it was reset before we
/// took it), rather than the listener or the process.
fn is_one_connections(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionReset
    )
}
