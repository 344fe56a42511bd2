//! The request-size limit of the ingest API (`ingest.message_bytes_max`), enforced on the HTTP/2
//! body before tonic reads a message. Runs on the core serving the connection.
//!
//! tonic's own limit answers an oversized message with its OUT_OF_RANGE text and ends a stream.
//! Here the body is read through [`LimitedBody`], which follows the gRPC framing (a 1-byte
//! compression flag and a 4-byte big-endian length before each message): a message over the
//! limit is never buffered — its bytes are skipped as they arrive — and an empty message takes
//! its place, so tonic hands the service a default request. The skipped message's size and its
//! `batch_id` (field 1, read from its first bytes) go to the request's [`OversizeLog`], where
//! the service finds them by message sequence number and answers that one batch `TOO_LARGE`,
//! naming the limit and both sizes. A stream goes on with its next message.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper::body::{Body, Bytes, Frame};

/// Length of a gRPC message prefix: compression flag + 4-byte length.
const PREFIX_BYTES: usize = 5;
/// Bytes of a skipped message kept to read its `batch_id` (tag + 10-byte varint).
const PROBE_BYTES: usize = 11;
/// Oversized messages remembered per request before the oldest are forgotten; the service
/// takes each as soon as tonic hands it the empty message, so a few suffice.
const LOG_ENTRIES_MAX: usize = 64;

/// One message skipped for its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversized {
    /// Position of the message in its request stream (0 for unary calls).
    pub sequence: u64,
    /// Its length in bytes.
    pub bytes: usize,
    /// The limit it exceeded.
    pub limit: usize,
    /// Its `batch_id` (field 1) when the message starts with it, else 0.
    pub batch_id: u64,
}

impl Oversized {
    /// The refusal's reason, naming the key and both sizes.
    pub fn reason(&self) -> String {
        format!(
            "request message of {} bytes is over `ingest.message_bytes_max` = {} bytes; split the batch",
            self.bytes, self.limit
        )
    }
}

/// The oversized messages of one request, shared by its body and its handler.
#[derive(Debug, Default)]
pub struct OversizeLog {
    entries: Mutex<VecDeque<Oversized>>,
}

impl OversizeLog {
    /// The log [`limit_request`] put in a request's extensions.
    pub fn of(extensions: &tonic::Extensions) -> Option<Arc<OversizeLog>> {
        extensions.get::<Arc<OversizeLog>>().cloned()
    }

    /// Takes the entry of message `sequence`, if that message was skipped.
    pub fn take(&self, sequence: u64) -> Option<Oversized> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let position = entries.iter().position(|e| e.sequence == sequence)?;
        entries.remove(position)
    }

    fn push(&self, entry: Oversized) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= LOG_ENTRIES_MAX {
            entries.pop_front();
        }
        entries.push_back(entry);
    }
}

/// The entry of message `sequence` in a request's log (put there by [`limit_request`]).
pub fn take_oversized(extensions: &tonic::Extensions, sequence: u64) -> Option<Oversized> {
    OversizeLog::of(extensions)?.take(sequence)
}

/// Wraps a request's body in a [`LimitedBody`] and puts its log in the request's extensions.
pub fn limit_request<B>(request: hyper::Request<B>, limit: usize) -> hyper::Request<LimitedBody<B>> {
    let log = Arc::new(OversizeLog::default());
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(Arc::clone(&log));
    hyper::Request::from_parts(parts, LimitedBody::new(body, limit, log))
}

/// Where the reader is in the gRPC framing.
#[derive(Debug)]
enum State {
    /// Reading a message prefix (`filled` of its 5 bytes so far).
    Prefix { prefix: [u8; PREFIX_BYTES], filled: usize },
    /// Passing `remaining` bytes of an accepted message through.
    Pass { remaining: usize },
    /// Skipping `remaining` bytes of an oversized message of `bytes`, keeping its first bytes.
    Skip {
        remaining: usize,
        bytes: usize,
        probe: Vec<u8>,
    },
}

/// A request body that skips gRPC messages over a size limit (see the module docs).
#[derive(Debug)]
pub struct LimitedBody<B> {
    inner: B,
    limit: usize,
    log: Arc<OversizeLog>,
    state: State,
    /// Sequence number of the message being read.
    sequence: u64,
    /// Data ready to hand out, in order.
    ready: VecDeque<Bytes>,
}

impl<B> LimitedBody<B> {
    /// Wraps `inner`; messages over `limit` bytes are skipped and logged in `log`.
    pub fn new(inner: B, limit: usize, log: Arc<OversizeLog>) -> Self {
        LimitedBody {
            inner,
            limit,
            log,
            state: State::Prefix {
                prefix: [0; PREFIX_BYTES],
                filled: 0,
            },
            sequence: 0,
            ready: VecDeque::new(),
        }
    }

    /// Runs the framing over one chunk, queueing what passes.
    fn feed(&mut self, chunk: Bytes) {
        let mut at = 0;
        while at < chunk.len() {
            match &mut self.state {
                State::Prefix { prefix, filled } => {
                    let take = (PREFIX_BYTES - *filled).min(chunk.len() - at);
                    prefix[*filled..*filled + take].copy_from_slice(&chunk[at..at + take]);
                    *filled += take;
                    at += take;
                    if *filled == PREFIX_BYTES {
                        let prefix = *prefix;
                        self.start_message(prefix);
                    }
                }
                State::Pass { remaining } => {
                    let take = (*remaining).min(chunk.len() - at);
                    self.ready.push_back(chunk.slice(at..at + take));
                    *remaining -= take;
                    at += take;
                    if *remaining == 0 {
                        self.next_message();
                    }
                }
                State::Skip { remaining, probe, .. } => {
                    let take = (*remaining).min(chunk.len() - at);
                    let keep = (PROBE_BYTES - probe.len().min(PROBE_BYTES)).min(take);
                    probe.extend_from_slice(&chunk[at..at + keep]);
                    *remaining -= take;
                    at += take;
                    if *remaining == 0 {
                        self.finish_skip();
                    }
                }
            }
        }
    }

    fn start_message(&mut self, prefix: [u8; PREFIX_BYTES]) {
        let bytes = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if bytes > self.limit {
            self.state = State::Skip {
                remaining: bytes,
                bytes,
                probe: Vec::with_capacity(PROBE_BYTES),
            };
            return;
        }
        self.ready.push_back(Bytes::copy_from_slice(&prefix));
        if bytes == 0 {
            self.next_message();
        } else {
            self.state = State::Pass { remaining: bytes };
        }
    }

    fn finish_skip(&mut self) {
        if let State::Skip { bytes, probe, .. } = &self.state {
            self.log.push(Oversized {
                sequence: self.sequence,
                bytes: *bytes,
                limit: self.limit,
                batch_id: leading_field_one(probe).unwrap_or(0),
            });
        }
        // An empty, uncompressed message stands in for the skipped one.
        self.ready.push_back(Bytes::from_static(&[0; PREFIX_BYTES]));
        self.next_message();
    }

    fn next_message(&mut self) {
        self.sequence += 1;
        self.state = State::Prefix {
            prefix: [0; PREFIX_BYTES],
            filled: 0,
        };
    }
}

/// Field 1 as a varint, when the message starts with it (protobuf encoders write fields in
/// field-number order).
fn leading_field_one(bytes: &[u8]) -> Option<u64> {
    let (&tag, rest) = bytes.split_first()?;
    if tag != 0x08 {
        return None;
    }
    let mut value = 0u64;
    for (i, &byte) in rest.iter().take(10).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

impl<B> Body for LimitedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        loop {
            if let Some(data) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                other => return other,
            };
            match frame.into_data() {
                Ok(chunk) => self.feed(chunk),
                Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn message(batch_id: u64, payload_bytes: usize) -> Vec<u8> {
        let mut body = vec![0x08];
        let mut id = batch_id;
        loop {
            let byte = (id & 0x7f) as u8;
            id >>= 7;
            if id == 0 {
                body.push(byte);
                break;
            }
            body.push(byte | 0x80);
        }
        body.extend(std::iter::repeat_n(0x2a, payload_bytes));
        let mut framed = vec![0];
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend(body);
        framed
    }

    /// Reads `chunks` through a limited body; returns what passes and the log.
    fn run(chunks: Vec<Vec<u8>>, limit: usize) -> (Vec<u8>, Arc<OversizeLog>) {
        let stream = futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(c)))),
        );
        let inner = http_body_util::StreamBody::new(stream);
        let log = Arc::new(OversizeLog::default());
        let body = LimitedBody::new(inner, limit, Arc::clone(&log));
        let collected = futures::executor::block_on(body.collect()).expect("body");
        (collected.to_bytes().to_vec(), log)
    }

    #[test]
    fn small_messages_pass_unchanged_across_chunk_boundaries() {
        let whole: Vec<u8> = [message(1, 10), message(2, 0), message(300, 50)].concat();
        for split in [1, 3, 5, 7, 40] {
            let chunks: Vec<Vec<u8>> = whole.chunks(split).map(<[u8]>::to_vec).collect();
            let (out, log) = run(chunks, 100);
            assert_eq!(out, whole, "split {split}");
            assert_eq!(log.take(0), None);
        }
    }

    #[test]
    fn oversized_message_becomes_empty_and_is_logged_with_its_batch_id() {
        let whole: Vec<u8> = [message(1, 10), message(300, 5000), message(3, 10)].concat();
        for split in [2, 6, 999, whole.len()] {
            let chunks: Vec<Vec<u8>> = whole.chunks(split).map(<[u8]>::to_vec).collect();
            let (out, log) = run(chunks, 1000);
            let expected: Vec<u8> = [message(1, 10), vec![0; 5], message(3, 10)].concat();
            assert_eq!(out, expected, "split {split}");
            let entry = log.take(1).expect("message 1 logged");
            assert_eq!((entry.batch_id, entry.bytes, entry.limit), (300, 5003, 1000));
            assert!(entry.reason().contains("`ingest.message_bytes_max` = 1000 bytes"));
            assert_eq!(log.take(0), None);
        }
    }

    proptest::proptest! {
        /// Arbitrary bytes in arbitrary chunks (gRPC frames cut anywhere, lengths that lie) are
        /// passed on or skipped, never panicked on; nothing passed on is longer than what came.
        #[test]
        fn arbitrary_frames_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            split in 1usize..64,
            limit in 1usize..300,
        ) {
            let chunks: Vec<Vec<u8>> = bytes.chunks(split).map(<[u8]>::to_vec).collect();
            let (out, _) = run(chunks, limit);
            proptest::prop_assert!(out.len() <= bytes.len());
        }

        /// Well-formed frames of any sizes: each at most the limit passes unchanged, each over it
        /// becomes an empty message logged with its size.
        #[test]
        fn frames_over_the_limit_and_only_those_are_skipped(
            sizes in proptest::collection::vec(0usize..400, 1..8),
            split in 1usize..97,
        ) {
            let limit = 200;
            let messages: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| message(i as u64 + 1, n)).collect();
            let whole = messages.concat();
            let (out, log) = run(whole.chunks(split).map(<[u8]>::to_vec).collect(), limit);
            let mut expected = Vec::new();
            for (i, framed) in messages.iter().enumerate() {
                if framed.len() - PREFIX_BYTES > limit {
                    expected.extend_from_slice(&[0; PREFIX_BYTES]);
                    let entry = log.take(i as u64).expect("logged");
                    proptest::prop_assert_eq!(entry.bytes, framed.len() - PREFIX_BYTES);
                    proptest::prop_assert_eq!(entry.batch_id, i as u64 + 1);
                } else {
                    expected.extend_from_slice(framed);
                }
            }
            proptest::prop_assert_eq!(out, expected);
        }
    }

    #[test]
    fn varint_reader_stops_at_ten_bytes() {
        assert_eq!(leading_field_one(&[0x08, 0xac, 0x02]), Some(300));
        assert_eq!(leading_field_one(&[0x12, 0x01]), None);
        assert_eq!(leading_field_one(&[0x08, 0xff, 0xff]), None);
    }
}
