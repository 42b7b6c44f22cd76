//! How a connection travels from the application to its destination: the one enum the proxy
//! records, and the metrics and the access log name. The mesh's configuration says only which
//! tunnel to use between nodes (`mesh_model::Transport`, TLS or QUIC); this is what a
//! connection actually took.

use std::fmt;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Transport {
    /// A tunnel session over TLS 1.3 on TCP, to the destination pod's :15008.
    Tls,
    /// A stream of a QUIC connection, to the destination pod's UDP :15008.
    Quic,
    /// To a pod of this node, without a tunnel.
    Local,
    /// Plaintext from outside the mesh to a pod (PERMISSIVE mode).
    Plaintext,
    /// To a destination outside the mesh, unchanged. Also what an outbound connection is
    /// until it is routed.
    #[default]
    Passthrough,
}

impl Transport {
    /// The label value and the access log's `transport` field.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tls => "tls",
            Transport::Quic => "quic",
            Transport::Local => "local",
            Transport::Plaintext => "plaintext",
            Transport::Passthrough => "passthrough",
        }
    }
}

impl From<mesh_model::Transport> for Transport {
    fn from(t: mesh_model::Transport) -> Self {
        match t {
            mesh_model::Transport::Tls => Transport::Tls,
            mesh_model::Transport::Quic => Transport::Quic,
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
