//! The accept loop: HTTP/1.1 connections served by the router, counted, droppable one
//! by one (fault injection) and drained on shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower_service::Service as _;

use super::rest::ConnectionControl;

/// How long open connections get to finish their requests after shutdown starts.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Accepts connections until `shutdown` is cancelled, then lets the open ones finish
/// (waiting receives end at once) for at most [`DRAIN_LIMIT`].
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    connections: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.fetch_add(1, Ordering::Relaxed);
                    tracing::trace!(%peer, "connection accepted");
                    tasks.spawn(connection(stream, router.clone(), shutdown.clone()));
                }
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            () = shutdown.cancelled() => break,
        }
    }
    drop(listener);
    let drained =
        tokio::time::timeout(DRAIN_LIMIT, async { while tasks.join_next().await.is_some() {} })
            .await;
    if drained.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "connections still open after the drain limit; closing them"
        );
        tasks.abort_all();
    }
}

/// Serves one connection until the client closes it, a fault drops it, or shutdown.
async fn connection(stream: TcpStream, router: Router, shutdown: CancellationToken) {
    // Small request/response exchanges: do not wait to fill packets.
    stream.set_nodelay(true).ok();
    let control = CancellationToken::new();
    let request_control = ConnectionControl(control.clone());
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(request_control.clone());
        // A `Router` is always ready, so calling it without `poll_ready` is fine.
        router.clone().call(request.map(axum::body::Body::new))
    });
    let served = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::pin!(served);
    tokio::select! {
        result = served.as_mut() => {
            if let Err(error) = result {
                tracing::debug!(%error, "connection ended with an error");
            }
        }
        // Dropping the connection closes the socket without an answer.
        () = control.cancelled() => {}
        () = shutdown.cancelled() => {
            served.as_mut().graceful_shutdown();
            tokio::select! {
                _ = served.as_mut() => {}
                () = control.cancelled() => {}
            }
        }
    }
}
