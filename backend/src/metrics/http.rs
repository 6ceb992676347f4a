//! The `/metrics` endpoint: a blocking HTTP server (tiny_http) on a thread of its own.
//! `GET /metrics` answers the text exposition format; anything else is 404.

use std::{
    io,
    net::{SocketAddr, TcpListener},
    sync::Arc,
    thread::JoinHandle,
};

use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
use tiny_http::{Header, Method, Response, Server};

use super::Metrics;

/// The running endpoint; dropping it stops the thread.
pub struct Endpoint {
    server: Arc<Server>,
    thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl Endpoint {
    /// Serves `metrics` on `listener` (already bound, so a bind error is the caller's to
    /// word).
    pub fn start(listener: TcpListener, metrics: Arc<Metrics>) -> io::Result<Endpoint> {
        let addr = listener.local_addr()?;
        let server = Arc::new(Server::from_listener(listener, None).map_err(io::Error::other)?);
        let content_type = Header::from_bytes("Content-Type", CONTENT_TYPE)
            .map_err(|()| io::Error::other("bad Content-Type header"))?;
        let thread = {
            let server = server.clone();
            std::thread::Builder::new()
                .name("parallax-metrics".into())
                .spawn(move || {
                    // Ends once `unblock` is called.
                    for req in server.incoming_requests() {
                        let path = req.url().split('?').next().unwrap_or("");
                        let r = if *req.method() == Method::Get && path == "/metrics" {
                            req.respond(
                                Response::from_string(metrics.encode())
                                    .with_header(content_type.clone())
                                    // A Content-Length rather than chunks, for any client.
                                    .with_chunked_threshold(usize::MAX),
                            )
                        } else {
                            req.respond(Response::from_string("not found\n").with_status_code(404))
                        };
                        if let Err(e) = r {
                            tracing::debug!("metrics: answering a scrape failed: {e}");
                        }
                    }
                })?
        };
        Ok(Endpoint {
            server,
            thread: Some(thread),
            addr,
        })
    }

    /// The address it listens on (the real port when configured with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the thread.
    pub fn stop(mut self) {
        self.stop_thread();
    }

    fn stop_thread(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("metrics thread panicked");
            }
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop_thread();
    }
}
