//! Record framing in a segment: `[length: u32 LE][crc32c of the body: u32 LE][body]`. A zero
//! length followed by zeros is a clean end; anything else that does not check out — a length
//! past the end of the file or over the limit, a checksum mismatch — is a torn tail: the
//! records before it are kept, it and everything after it are skipped. (`DmaStreamWriter::sync`
//! pads the last block with whatever its buffer held, so after a crash the tail is usually
//! "torn" padding; a record is only ever trusted when its checksum matches.)

/// Bytes of a frame header.
pub const HEADER_BYTES: usize = 8;
/// Largest record body a frame may carry.
pub const RECORD_BYTES_MAX: usize = 64 << 20;

/// Appends the frame of `body` to `out`.
pub fn encode(body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.extend_from_slice(body);
}

/// Records framed by their caller, back to back in one buffer, as a segment will hold them: the
/// spool appends the buffer as it is (no copy per record, no buffer per record). A caller
/// encodes each record straight into it ([`Framed::push_with`]).
#[derive(Debug, Default)]
pub struct Framed {
    /// The frames, back to back.
    bytes: Vec<u8>,
    /// Where each record's frame starts in `bytes`.
    starts: Vec<usize>,
    /// The length of the first body that no frame may carry (empty, or over
    /// [`RECORD_BYTES_MAX`]): such a batch is refused whole.
    refused: Option<usize>,
}

impl Framed {
    /// Room for about `bytes` of bodies in `records` records.
    pub fn with_capacity(bytes: usize, records: usize) -> Framed {
        Framed {
            bytes: Vec::with_capacity(bytes + records * HEADER_BYTES),
            starts: Vec::with_capacity(records),
            refused: None,
        }
    }

    /// Frames one record whose body `write` appends to the buffer it is given (and nothing
    /// else: what it appends is the body).
    pub fn push_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&[0; HEADER_BYTES]);
        write(&mut self.bytes);
        let body = &self.bytes[start + HEADER_BYTES..];
        let length = body.len();
        if self.refused.is_none() && (length == 0 || length > RECORD_BYTES_MAX) {
            self.refused = Some(length);
        }
        let checksum = crc32c::crc32c(body);
        self.bytes[start..start + 4].copy_from_slice(&(length as u32).to_le_bytes());
        self.bytes[start + 4..start + HEADER_BYTES].copy_from_slice(&checksum.to_le_bytes());
        self.starts.push(start);
    }

    /// Frames one record.
    pub fn push(&mut self, body: &[u8]) {
        self.push_with(|out| out.extend_from_slice(body));
    }

    /// Records framed.
    pub fn records(&self) -> usize {
        self.starts.len()
    }

    /// The frames, back to back.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where each record's frame starts in [`Framed::bytes`].
    pub fn starts(&self) -> &[usize] {
        &self.starts
    }

    /// The body of record `index`.
    pub fn body(&self, index: usize) -> Option<&[u8]> {
        let start = *self.starts.get(index)? + HEADER_BYTES;
        let end = self.starts.get(index + 1).map_or(self.bytes.len(), |next| *next);
        self.bytes.get(start..end)
    }

    /// The length of the first body no frame may carry (empty, or over [`RECORD_BYTES_MAX`]).
    pub fn refused(&self) -> Option<usize> {
        self.refused
    }
}

/// Where the frame of `body` — a record [`decode`] returned from `bytes` — starts in `bytes`.
pub fn frame_offset(bytes: &[u8], body: &[u8]) -> usize {
    body.as_ptr() as usize - bytes.as_ptr() as usize - HEADER_BYTES
}

/// How a segment's bytes end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tail {
    /// After the last record: end of file or zero padding.
    Clean,
    /// A record that does not check out, at this offset.
    Torn {
        /// Offset of the bad frame.
        offset: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// Splits a segment into record bodies, stopping at the first frame that does not check out.
pub fn decode(bytes: &[u8]) -> (Vec<&[u8]>, Tail) {
    let mut records = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let torn = |reason: String| Tail::Torn { offset, reason };
        let Some(header) = bytes.get(offset..offset + HEADER_BYTES) else {
            if bytes[offset..].iter().all(|&b| b == 0) {
                return (records, Tail::Clean);
            }
            return (records, torn("truncated frame header".into()));
        };
        let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let checksum = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if length == 0 {
            if bytes[offset..].iter().all(|&b| b == 0) {
                return (records, Tail::Clean);
            }
            return (records, torn("zero-length frame followed by data".into()));
        }
        if length > RECORD_BYTES_MAX {
            return (
                records,
                torn(format!("length {length} over the {RECORD_BYTES_MAX}-byte limit")),
            );
        }
        let start = offset + HEADER_BYTES;
        let Some(body) = bytes.get(start..start + length) else {
            return (
                records,
                torn(format!("length {length} runs past the end of the segment")),
            );
        };
        if crc32c::crc32c(body) != checksum {
            return (records, torn("checksum mismatch".into()));
        }
        records.push(body);
        offset = start + length;
    }
    (records, Tail::Clean)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn padding_is_a_clean_end_and_damage_is_torn() {
        let mut bytes = Vec::new();
        encode(b"one", &mut bytes);
        encode(b"two", &mut bytes);
        let clean_len = bytes.len();
        bytes.extend_from_slice(&[0; 100]);
        assert_eq!(decode(&bytes), (vec![&b"one"[..], &b"two"[..]], Tail::Clean));
        // A flipped bit in the second body.
        let mut damaged = bytes.clone();
        damaged[clean_len - 1] ^= 1;
        let (records, tail) = decode(&damaged);
        assert_eq!(records, vec![&b"one"[..]]);
        assert!(matches!(tail, Tail::Torn { offset: 11, .. }), "{tail:?}");
        // A frame cut short.
        let (records, tail) = decode(&bytes[..clean_len - 2]);
        assert_eq!(records.len(), 1);
        assert!(matches!(tail, Tail::Torn { .. }));
    }

    /// Records framed in place are the frames [`encode`] writes, and decode back to their bodies.
    #[test]
    fn framed_records_are_the_frames_encode_writes() {
        let mut framed = Framed::with_capacity(16, 3);
        framed.push(b"one");
        framed.push_with(|out| out.extend_from_slice(b"three"));
        framed.push(b"two");
        let mut expected = Vec::new();
        for body in [&b"one"[..], b"three", b"two"] {
            encode(body, &mut expected);
        }
        assert_eq!(framed.bytes(), expected.as_slice());
        assert_eq!(framed.starts(), &[0, 11, 24]);
        assert_eq!(framed.body(1), Some(&b"three"[..]));
        assert_eq!(framed.body(3), None);
        assert_eq!(decode(framed.bytes()).0, vec![&b"one"[..], b"three", b"two"]);
        assert_eq!(framed.refused(), None);
        framed.push(b"");
        framed.push(b"four");
        assert_eq!(framed.refused(), Some(0), "an empty body is refused, and remembered");
    }

    proptest! {
        /// Whatever the bytes, decoding never panics, and every record it returns checks out.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (records, _) = decode(&bytes);
            for record in records {
                prop_assert!(record.len() <= RECORD_BYTES_MAX);
            }
        }

        /// Any prefix of a valid segment yields a prefix of its records.
        #[test]
        fn prefixes_yield_prefixes(bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..10), cut in 0usize..1000) {
            let mut bytes = Vec::new();
            for body in &bodies {
                encode(body, &mut bytes);
            }
            let cut = cut.min(bytes.len());
            let (records, _) = decode(&bytes[..cut]);
            prop_assert!(records.len() <= bodies.len());
            for (record, body) in records.iter().zip(&bodies) {
                prop_assert_eq!(*record, body.as_slice());
            }
        }
    }
}
