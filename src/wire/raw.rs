//! Protobuf rows kept encoded: the ingest service's view of `shardgate.v1.RowBatch`
//! ([`RowBatch`], wire-identical to the generated one, its rows left as bytes that share the
//! request's buffer) and the reader that writes an encoded row's values straight into
//! serialized CQL cells, with no `Value` tree ([`write_value`]).
//!
//! What is read here: a row's `values`, and in each value one kind among the scalars and lists
//! or sets of them. Everything else — a map, decimal, UDT, tuple, vector or duration, a value
//! with more than one kind field (protobuf merges those), a field this reader does not know,
//! any malformed byte — is decoded by prost and converted by [`convert::write_cell`], so what
//! is accepted and every error read as they do for a decoded row.
//!
//! Threads: pure functions, run on the core that binds the rows.

use bytes::Bytes;
use prost::Message;
use scylla::cluster::metadata::{CollectionType, ColumnType, NativeType};

use super::convert::{self, ConvertError, CQL_DATE_EPOCH, NANOS_PER_DAY, NESTING_MAX};
use super::proto::Value;
use crate::sink::scylla::bound::{put, put_integer, write_collection};

/// `shardgate.v1.RowBatch` with its rows encoded (each a `shardgate.v1.Row`).
#[derive(Clone, PartialEq, Message)]
pub struct RowBatch {
    /// `keyspace.table`.
    #[prost(string, tag = "1")]
    pub table: String,
    /// Column names, in the order of each row's values.
    #[prost(string, repeated, tag = "2")]
    pub columns: Vec<String>,
    /// The rows, each an encoded `shardgate.v1.Row`.
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub rows: Vec<Bytes>,
    /// Write timestamp in microseconds; 0 = the gateway's clock.
    #[prost(int64, tag = "4")]
    pub timestamp_us: i64,
}

/// Why an encoded value was not written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// The bytes are not a protobuf `Value`.
    #[error("not a valid protobuf value: {0}")]
    Malformed(String),
    /// The value does not fit its column.
    #[error("{0}")]
    Convert(ConvertError),
}

/// One field of a protobuf message.
#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Length(&'a [u8]),
    Fixed32([u8; 4]),
}

/// Reads a protobuf message's fields in order. Strict: a varint longer than ten bytes or past
/// 64 bits, a group, a length past the end — anything prost would refuse — ends the reading
/// with `None`.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    /// A varint; one byte (tags, short lengths, small numbers) without a loop.
    #[inline(always)]
    fn varint(&mut self) -> Option<u64> {
        match self.0 {
            [byte, rest @ ..] if *byte < 0x80 => {
                self.0 = rest;
                Some(u64::from(*byte))
            }
            _ => self.long_varint(),
        }
    }

    #[inline(never)]
    fn long_varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for (i, &byte) in self.0.iter().enumerate().take(10) {
            if i == 9 && byte > 1 {
                return None;
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                self.0 = &self.0[i + 1..];
                return Some(value);
            }
        }
        None
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (bytes, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*bytes)
    }

    /// The next field as (field number, value); `None` at the end or on anything unusual.
    /// Inlined: returned through memory, its result cost more than the parsing (a profile's
    /// hottest instructions were the reads of it after the call).
    #[inline(always)]
    fn next_field(&mut self) -> Option<(u64, Field<'a>)> {
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 || number > u64::from(u32::MAX >> 3) {
            return None;
        }
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed64(self.take()?),
            2 => {
                let length = usize::try_from(self.varint()?).ok()?;
                if length > self.0.len() {
                    return None;
                }
                let (bytes, rest) = self.0.split_at(length);
                self.0 = rest;
                Field::Length(bytes)
            }
            5 => Field::Fixed32(self.take()?),
            _ => return None,
        };
        Some((number, field))
    }

    /// Every field of a message, or `None` when any is unusual.
    fn all(bytes: &'a [u8]) -> impl Iterator<Item = Option<(u64, Field<'a>)>> {
        let mut fields = Fields(bytes);
        std::iter::from_fn(move || (!fields.0.is_empty()).then(|| fields.next_field()))
    }
}

/// The `values` (field 1, length-delimited) of a `Row` or `Values` message in order; `None`
/// when the message holds any other field or is malformed.
pub fn repeated_values(message: &[u8]) -> impl Iterator<Item = Option<&[u8]>> {
    Fields::all(message).map(|field| match field? {
        (1, Field::Length(bytes)) => Some(bytes),
        _ => None,
    })
}

/// How many values [`repeated_values`] finds, or `None` when the message is not plain.
pub fn count_values(message: &[u8]) -> Option<usize> {
    repeated_values(message).try_fold(0usize, |count, value| value.map(|_| count + 1))
}

/// Appends the encoded `Value` in `value`, for a column of type `typ`, to `buffer` as one
/// serialized CQL cell: the bytes that decoding it with prost and [`convert::write_cell`]
/// give. On error `buffer` is as it was.
pub fn write_value(value: &[u8], typ: &ColumnType<'_>, buffer: &mut Vec<u8>) -> Result<(), ValueError> {
    let start = buffer.len();
    if write_direct(value, typ, buffer, 0).is_some() {
        return Ok(());
    }
    buffer.truncate(start);
    let decoded = Value::decode(value).map_err(|e| ValueError::Malformed(e.to_string()))?;
    convert::write_cell(&decoded, typ, buffer).map_err(ValueError::Convert)
}

/// Zigzag decoding of a `sint64`.
fn zigzag64(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// Zigzag decoding of a `sint32` (prost keeps the varint's low 32 bits).
fn zigzag32(n: u64) -> i32 {
    let n = n as u32;
    ((n >> 1) as i32) ^ -((n & 1) as i32)
}

/// [`write_value`]'s direct path: `None` when the value is left to prost and
/// [`convert::write_cell`] (the caller truncates `buffer`). Mirrors `convert`'s direct path
/// kind by kind: the value's one kind field, its protobuf wire type, then the column's type.
fn write_direct(value: &[u8], typ: &ColumnType<'_>, buffer: &mut Vec<u8>, depth: usize) -> Option<()> {
    if depth > NESTING_MAX {
        return None;
    }
    let mut kind = None;
    for field in Fields::all(value) {
        let (number, field) = field?;
        // A second kind field merges or replaces the first in prost: left to it, as is any
        // field `Value` does not declare.
        if kind.is_some() || number > 23 {
            return None;
        }
        kind = Some((number, field));
    }
    let native = |n: &NativeType| matches!(typ, ColumnType::Native(t) if t == n);
    match kind {
        // No kind, or `null`: a CQL null; an element cannot be null.
        None | Some((1, Field::Varint(_))) if depth == 0 => {
            buffer.extend_from_slice(&(-1i32).to_be_bytes());
            Some(())
        }
        Some((2, Field::Length(text))) if native(&NativeType::Text) => {
            put(buffer, std::str::from_utf8(text).ok()?.as_bytes())
        }
        Some((2, Field::Length(text))) if native(&NativeType::Ascii) && text.is_ascii() => put(buffer, text),
        Some((3, Field::Varint(n))) => match typ {
            ColumnType::Native(native) => put_integer(buffer, native, zigzag64(n)),
            _ => None,
        },
        // Protobuf's fixed-width numbers are little-endian, CQL's big-endian: the same bits.
        Some((4, Field::Fixed32(bits))) if native(&NativeType::Float) => {
            put(buffer, &u32::from_le_bytes(bits).to_be_bytes())
        }
        Some((5, Field::Fixed64(bits))) if native(&NativeType::Double) => {
            put(buffer, &u64::from_le_bytes(bits).to_be_bytes())
        }
        Some((6, Field::Varint(b))) if native(&NativeType::Boolean) => put(buffer, &[u8::from(b != 0)]),
        Some((7, Field::Length(blob))) if native(&NativeType::Blob) => put(buffer, blob),
        Some((8, Field::Length(id))) if native(&NativeType::Uuid) && id.len() == 16 => put(buffer, id),
        // A timeuuid is a version 1 UUID: the version is the high nibble of byte 6.
        Some((8 | 9, Field::Length(id))) if native(&NativeType::Timeuuid) && id.len() == 16 && id[6] >> 4 == 1 => {
            put(buffer, id)
        }
        Some((10, Field::Varint(ms))) if native(&NativeType::Timestamp) => put(buffer, &zigzag64(ms).to_be_bytes()),
        Some((11, Field::Varint(days))) if native(&NativeType::Date) => put(
            buffer,
            &((i64::from(zigzag32(days)) + CQL_DATE_EPOCH) as u32).to_be_bytes(),
        ),
        Some((12, Field::Varint(ns))) if native(&NativeType::Time) && (0..NANOS_PER_DAY).contains(&zigzag64(ns)) => {
            put(buffer, &zigzag64(ns).to_be_bytes())
        }
        Some((14, Field::Length(varint))) if native(&NativeType::Varint) && !varint.is_empty() => put(buffer, varint),
        Some((15, Field::Length(ip))) if native(&NativeType::Inet) && (ip.len() == 4 || ip.len() == 16) => {
            put(buffer, ip)
        }
        Some((16 | 17, Field::Length(items))) => {
            let element = match (kind.map(|(n, _)| n), typ) {
                (
                    Some(16),
                    ColumnType::Collection {
                        typ: CollectionType::List(element) | CollectionType::Set(element),
                        ..
                    },
                )
                | (
                    Some(17),
                    ColumnType::Collection {
                        typ: CollectionType::Set(element),
                        ..
                    },
                ) => element,
                _ => return None,
            };
            write_collection(buffer, |buffer| {
                let mut count = 0usize;
                for item in repeated_values(items) {
                    write_direct(item?, element, buffer, depth + 1)?;
                    count += 1;
                }
                Some(count)
            })
        }
        _ => None,
    }
}
