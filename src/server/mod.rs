//! gRPC on glommio, shared by every service the gateway serves (ingest today; query next).
//! `http2` serves tonic routes over glommio sockets; `limit` skips request messages over
//! `ingest.message_bytes_max` and answers them TOO_LARGE; `gate` puts that limit and `ingest.auth`'s
//! authentication in front of every call; `codec` is the protobuf codec whose
//! decode errors are the client's (MALFORMED); `status` is the one `ErrorCode` → gRPC status
//! map and the codes' documentation; `topology` answers `GetTopology`.
//!
//! Threads: every core (its own port and the shared SO_REUSEPORT port); each connection and
//! every request on it stays on the core that accepted it.

pub mod codec;
pub mod gate;
#[cfg(test)]
mod hostile;
pub mod http2;
pub mod limit;
pub mod status;
pub mod topology;
