//! Network (L4) filters: connection-level decisions taken before the terminal filter
//! (HTTP connection manager or TCP proxy) takes the connection.

use std::net::SocketAddr;

#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub listener: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkAction {
    Continue,
    /// Close the connection; the reason is logged.
    Close(String),
}

pub trait NetworkFilter: Send + Sync + 'static {
    fn on_new_connection(&self, conn: &ConnectionInfo) -> NetworkAction;
}
