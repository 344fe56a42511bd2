//! What a spool record holds, with its kind explicit. A record body is one kind byte, then:
//! - [`KIND_ROUTE`]: a source message of a route (`ack = "spooled"`), a FlatBuffers
//!   `shardgate.spool.SpoolRecord` (`schemas/spool_record.fbs`) naming its route;
//! - [`KIND_GRPC`]: a gRPC ingest batch (`ACK_MODE_SPOOLED`), its rows validated and its write
//!   timestamp resolved, as the protobuf `shardgate.v1.RowBatch` bytes — serialized once.
//!
//! Records written before the kind byte existed are a bare FlatBuffers `SpoolRecord` (a gRPC
//! batch was then route `""` with the protobuf bytes as payload). A FlatBuffers buffer starts
//! with the offset of its root table, a multiple of 4, so its first byte is too; the kind bytes
//! (1, 2) are not, and [`decode`] tells the two apart without guessing. Pure; runs on the core
//! that owns the spool.

use bytes::Bytes;

use super::frame::Framed;
use crate::wire::generated::spool_record::shardgate::spool as fb;

/// Kind byte of a route's source message.
pub const KIND_ROUTE: u8 = 1;
/// Kind byte of a gRPC ingest batch.
pub const KIND_GRPC: u8 = 2;

/// About how many bytes a route's record body takes beyond its key and payload (route name,
/// coordinates, FlatBuffers tables; a Kafka order's takes 302): sizes a batch's buffer up front
/// ([`route_batch`]) so it is not grown while the batch is encoded.
const ROUTE_RECORD_OVERHEAD_BYTES: usize = 384;

/// An empty frame buffer for the records of `messages` route messages whose keys and payloads
/// take `key_and_payload_bytes`, sized so encoding them does not grow it.
pub fn route_batch(messages: usize, key_and_payload_bytes: usize) -> Framed {
    Framed::with_capacity(key_and_payload_bytes + messages * ROUTE_RECORD_OVERHEAD_BYTES, messages)
}

/// A route's source message as the spool keeps it, read back: its key and payload are views
/// of the buffer the record was read into.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteRecord {
    /// Position in its partition or stream.
    pub position: i64,
    /// Message time in milliseconds.
    pub timestamp_ms: Option<i64>,
    /// The write timestamp its rows get.
    pub write_timestamp_us: Option<i64>,
    /// Message key.
    pub key: Option<Bytes>,
    /// Payload; `None` for a tombstone.
    pub payload: Option<Bytes>,
    /// Text headers.
    pub headers: Vec<(String, String)>,
    /// Source coordinates, as the dead-letter headers name them: (name, value). The name is a
    /// view of the record (matched against the known names, never kept as text), the value the
    /// text a spooled origin keeps; both UTF-8, as the verifier checked.
    pub coordinates: Vec<(Bytes, String)>,
    /// Kafka partition, if it came from Kafka.
    pub partition: Option<i32>,
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// A route's source message, and the route it came in on (by name: a reordered config
    /// still replays right).
    Route {
        /// The route's name.
        route: &'a str,
        /// The message.
        message: RouteRecord,
    },
    /// A gRPC ingest batch: protobuf `shardgate.v1.RowBatch` bytes.
    Grpc(Bytes),
}

/// Encodes a route's messages as spool records straight into their frames, with one
/// FlatBuffers builder (and its buffer) for every message of a batch.
pub struct RouteEncoder {
    builder: flatbuffers::FlatBufferBuilder<'static>,
    /// The header or coordinate pairs of the message being encoded.
    pairs: Vec<flatbuffers::WIPOffset<fb::Pair<'static>>>,
}

impl Default for RouteEncoder {
    fn default() -> RouteEncoder {
        RouteEncoder {
            builder: flatbuffers::FlatBufferBuilder::new(),
            pairs: Vec::new(),
        }
    }
}

impl RouteEncoder {
    /// Encodes a route's message (borrowed parts of it) as the next record of `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode<'a>(
        &mut self,
        route: &str,
        position: i64,
        timestamp_ms: Option<i64>,
        write_timestamp_us: i64,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: impl Iterator<Item = (&'a str, &'a str)>,
        coordinates: impl Iterator<Item = (&'a str, &'a str)>,
        partition: Option<i32>,
        out: &mut Framed,
    ) {
        let builder = &mut self.builder;
        builder.reset();
        let route = builder.create_string(route);
        let key = key.map(|k| builder.create_vector(k));
        let payload = payload.map(|p| builder.create_vector(p));
        let headers = pairs(builder, headers, &mut self.pairs);
        let coordinates = pairs(builder, coordinates, &mut self.pairs);
        let record = fb::SpoolRecord::create(
            builder,
            &fb::SpoolRecordArgs {
                route: Some(route),
                key,
                payload,
                headers: Some(headers),
                coordinates: Some(coordinates),
                position,
                timestamp_ms,
                write_timestamp_us: Some(write_timestamp_us),
                partition,
            },
        );
        builder.finish(record, None);
        let body = builder.finished_data();
        out.push_with(|bytes| {
            bytes.push(KIND_ROUTE);
            bytes.extend_from_slice(body);
        });
    }
}

/// Encodes a gRPC batch from its protobuf encoding, as a batch of one record.
pub fn encode_grpc(batch: &impl prost::Message) -> Framed {
    let mut framed = Framed::with_capacity(batch.encoded_len() + 1, 1);
    framed.push_with(|bytes| {
        bytes.push(KIND_GRPC);
        // Encoding into a Vec only fails for lack of capacity, and a Vec grows.
        let _ = batch.encode(bytes);
    });
    framed
}

type Pairs<'b> = flatbuffers::WIPOffset<flatbuffers::Vector<'b, flatbuffers::ForwardsUOffset<fb::Pair<'b>>>>;

/// A vector of pairs; `offsets` is scratch space kept between calls.
fn pairs<'n, 'b>(
    builder: &mut flatbuffers::FlatBufferBuilder<'b>,
    items: impl Iterator<Item = (&'n str, &'n str)>,
    offsets: &mut Vec<flatbuffers::WIPOffset<fb::Pair<'b>>>,
) -> Pairs<'b> {
    offsets.clear();
    for (name, value) in items {
        let name = builder.create_string(name);
        let value = builder.create_string(value);
        offsets.push(fb::Pair::create(
            builder,
            &fb::PairArgs {
                name: Some(name),
                value: Some(value),
            },
        ));
    }
    builder.create_vector(offsets)
}

/// Decodes a record body of either layout (see the module docs), read back as `body`: its key,
/// payload or gRPC batch are views of it.
pub fn decode(body: &Bytes) -> Result<Record<'_>, String> {
    match body.first() {
        None => Err("empty spool record".to_string()),
        Some(&KIND_ROUTE) => {
            let (route, message) = decode_route(body, 1)?;
            Ok(Record::Route { route, message })
        }
        Some(&KIND_GRPC) => Ok(Record::Grpc(body.slice(1..))),
        Some(first) if first % 4 == 0 => {
            // Written before the kind byte: route "" was a gRPC batch in the payload.
            let (route, message) = decode_route(body, 0)?;
            if route.is_empty() {
                return Ok(Record::Grpc(message.payload.unwrap_or_default()));
            }
            Ok(Record::Route { route, message })
        }
        Some(kind) => Err(format!("unknown spool record kind {kind}")),
    }
}

/// Decodes the FlatBuffers `SpoolRecord` at `body[start..]`.
fn decode_route(body: &Bytes, start: usize) -> Result<(&str, RouteRecord), String> {
    let record =
        flatbuffers::root::<fb::SpoolRecord>(&body[start..]).map_err(|e| format!("not a spool record: {e}"))?;
    let route = record.route().ok_or("spool record without a route")?;
    let pairs = record.headers().into_iter().flatten();
    let headers = pairs
        .filter_map(|p| Some((p.name()?.to_string(), p.value()?.to_string())))
        .collect();
    let pairs = record.coordinates().into_iter().flatten();
    let coordinates = pairs
        .filter_map(|p| Some((body.slice_ref(p.name()?.as_bytes()), p.value()?.to_string())))
        .collect();
    let message = RouteRecord {
        position: record.position(),
        timestamp_ms: record.timestamp_ms(),
        write_timestamp_us: record.write_timestamp_us(),
        key: record.key().map(|k| body.slice_ref(k.bytes())),
        payload: record.payload().map(|p| body.slice_ref(p.bytes())),
        headers,
        coordinates,
        partition: record.partition(),
    };
    Ok((route, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_record() -> RouteRecord {
        RouteRecord {
            position: 42,
            timestamp_ms: Some(1_700_000_000_000),
            write_timestamp_us: Some(1_700_000_000_000_123),
            key: Some(Bytes::from_static(b"k")),
            payload: None,
            headers: vec![("tenant".into(), "acme".into())],
            coordinates: vec![(
                Bytes::from_static(b"shardgate.source.subject"),
                "orders.created".to_string(),
            )],
            partition: None,
        }
    }

    /// The body of `record` of route `route`, encoded as the spool frames it.
    fn encode(route: &str, record: &RouteRecord) -> Bytes {
        let mut framed = Framed::default();
        let mut encoder = RouteEncoder::default();
        // A first message leaves the builder dirty: the next record must not carry any of it.
        encoder.encode(
            "other",
            1,
            None,
            1,
            Some(&[9; 300]),
            None,
            std::iter::empty(),
            std::iter::once(("a", "b")),
            Some(3),
            &mut Framed::default(),
        );
        encoder.encode(
            route,
            record.position,
            record.timestamp_ms,
            record.write_timestamp_us.unwrap_or_default(),
            record.key.as_deref(),
            record.payload.as_deref(),
            record.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            record
                .coordinates
                .iter()
                .map(|(n, v)| (std::str::from_utf8(n).expect("UTF-8"), v.as_str())),
            record.partition,
            &mut framed,
        );
        Bytes::copy_from_slice(framed.body(0).expect("one record"))
    }

    #[test]
    fn route_records_round_trip_every_field() {
        let record = route_record();
        let bytes = encode("orders", &record);
        assert_eq!(bytes[0], KIND_ROUTE);
        assert_eq!(
            decode(&bytes),
            Ok(Record::Route {
                route: "orders",
                message: record
            }),
            "a tombstone stays a tombstone"
        );
        assert!(decode(&Bytes::from_static(b"garbage!")).is_err());
        assert!(decode(&Bytes::new()).is_err());
        assert!(
            decode(&Bytes::from_static(&[3, 0, 0, 0])).is_err(),
            "an unknown kind is refused"
        );
    }

    /// A decoded message's key and payload are views of the buffer it was read into.
    #[test]
    fn decoded_payloads_are_views_of_the_record() {
        let record = RouteRecord {
            payload: Some(Bytes::from_static(b"{\"id\":1}")),
            ..route_record()
        };
        let bytes = encode("orders", &record);
        let Ok(Record::Route { message, .. }) = decode(&bytes) else {
            panic!("not a route record");
        };
        let range = bytes.as_ptr_range();
        for part in [message.key.expect("key"), message.payload.expect("payload")] {
            assert!(range.contains(&part.as_ptr()), "{part:?} was copied");
        }
    }

    #[test]
    fn grpc_records_hold_the_protobuf_bytes_once() {
        let batch = crate::wire::proto::RowBatch {
            table: "ks.t".into(),
            columns: vec!["id".into()],
            rows: Vec::new(),
            timestamp_us: 7,
        };
        let framed = encode_grpc(&batch);
        assert_eq!(framed.records(), 1);
        let bytes = Bytes::copy_from_slice(framed.body(0).expect("one record"));
        assert_eq!(bytes[0], KIND_GRPC);
        assert_eq!(&bytes[1..], prost::Message::encode_to_vec(&batch).as_slice());
        assert_eq!(decode(&bytes), Ok(Record::Grpc(bytes.slice(1..))));
    }

    /// Spools written before the kind byte still replay: a bare FlatBuffers record is a route's
    /// message, and route "" the gRPC batch in its payload.
    #[test]
    fn records_without_a_kind_byte_still_decode() {
        let record = route_record();
        let legacy = encode("orders", &record).slice(1..);
        assert_eq!(legacy[0] % 4, 0, "a FlatBuffers root offset is 4-aligned");
        assert_eq!(
            decode(&legacy),
            Ok(Record::Route {
                route: "orders",
                message: record
            })
        );
        let grpc = RouteRecord {
            payload: Some(Bytes::from_static(&[10, 4, 107, 115, 46, 116])),
            ..RouteRecord::default()
        };
        let legacy = encode("", &grpc).slice(1..);
        assert_eq!(
            decode(&legacy),
            Ok(Record::Grpc(Bytes::from_static(&[10, 4, 107, 115, 46, 116])))
        );
    }
}
