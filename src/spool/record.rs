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

use crate::wire::generated::spool_record::shardgate::spool as fb;

/// Kind byte of a route's source message.
pub const KIND_ROUTE: u8 = 1;
/// Kind byte of a gRPC ingest batch.
pub const KIND_GRPC: u8 = 2;

/// A route's source message as the spool keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteRecord {
    /// The route the message came in on (by name: a reordered config still replays right).
    pub route: String,
    /// Position in its partition or stream.
    pub position: i64,
    /// Message time in milliseconds.
    pub timestamp_ms: Option<i64>,
    /// The write timestamp its rows get.
    pub write_timestamp_us: Option<i64>,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Payload; `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// Text headers.
    pub headers: Vec<(String, String)>,
    /// Source coordinates, as the dead-letter headers name them.
    pub coordinates: Vec<(String, String)>,
    /// Kafka partition, if it came from Kafka.
    pub partition: Option<i32>,
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A route's source message.
    Route(RouteRecord),
    /// A gRPC ingest batch: protobuf `shardgate.v1.RowBatch` bytes.
    Grpc(Vec<u8>),
}

/// Encodes a route's message (borrowed parts of it).
#[allow(clippy::too_many_arguments)]
pub fn encode_route<'a>(
    route: &str,
    position: i64,
    timestamp_ms: Option<i64>,
    write_timestamp_us: i64,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    coordinates: impl Iterator<Item = (&'a str, &'a str)>,
    partition: Option<i32>,
) -> Vec<u8> {
    let mut builder =
        flatbuffers::FlatBufferBuilder::with_capacity(64 + payload.map_or(0, <[u8]>::len) + key.map_or(0, <[u8]>::len));
    let route = builder.create_string(route);
    let key = key.map(|k| builder.create_vector(k));
    let payload = payload.map(|p| builder.create_vector(p));
    let headers = pairs(&mut builder, headers);
    let coordinates = pairs(&mut builder, coordinates);
    let record = fb::SpoolRecord::create(
        &mut builder,
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
    let mut bytes = Vec::with_capacity(body.len() + 1);
    bytes.push(KIND_ROUTE);
    bytes.extend_from_slice(body);
    bytes
}

/// Encodes a gRPC batch from its protobuf encoding.
pub fn encode_grpc(batch: &impl prost::Message) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(batch.encoded_len() + 1);
    bytes.push(KIND_GRPC);
    // Encoding into a Vec only fails for lack of capacity, and a Vec grows.
    let _ = batch.encode(&mut bytes);
    bytes
}

type Pairs<'b> = flatbuffers::WIPOffset<flatbuffers::Vector<'b, flatbuffers::ForwardsUOffset<fb::Pair<'b>>>>;

fn pairs<'n, 'b>(
    builder: &mut flatbuffers::FlatBufferBuilder<'b>,
    items: impl Iterator<Item = (&'n str, &'n str)>,
) -> Pairs<'b> {
    let offsets: Vec<_> = items
        .map(|(name, value)| {
            let name = builder.create_string(name);
            let value = builder.create_string(value);
            fb::Pair::create(
                builder,
                &fb::PairArgs {
                    name: Some(name),
                    value: Some(value),
                },
            )
        })
        .collect();
    builder.create_vector(&offsets)
}

/// Decodes a record of either layout (see the module docs).
pub fn decode(bytes: &[u8]) -> Result<Record, String> {
    match bytes.first() {
        None => Err("empty spool record".to_string()),
        Some(&KIND_ROUTE) => decode_route(&bytes[1..]).map(Record::Route),
        Some(&KIND_GRPC) => Ok(Record::Grpc(bytes[1..].to_vec())),
        Some(first) if first % 4 == 0 => {
            // Written before the kind byte: route "" was a gRPC batch in the payload.
            let record = decode_route(bytes)?;
            if record.route.is_empty() {
                return Ok(Record::Grpc(record.payload.unwrap_or_default()));
            }
            Ok(Record::Route(record))
        }
        Some(kind) => Err(format!("unknown spool record kind {kind}")),
    }
}

fn decode_route(bytes: &[u8]) -> Result<RouteRecord, String> {
    let record = flatbuffers::root::<fb::SpoolRecord>(bytes).map_err(|e| format!("not a spool record: {e}"))?;
    let route = record.route().ok_or("spool record without a route")?.to_string();
    let pairs = |list: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<fb::Pair<'_>>>>| {
        list.into_iter()
            .flatten()
            .filter_map(|p| Some((p.name()?.to_string(), p.value()?.to_string())))
            .collect::<Vec<_>>()
    };
    Ok(RouteRecord {
        route,
        position: record.position(),
        timestamp_ms: record.timestamp_ms(),
        write_timestamp_us: record.write_timestamp_us(),
        key: record.key().map(|k| k.bytes().to_vec()),
        payload: record.payload().map(|p| p.bytes().to_vec()),
        headers: pairs(record.headers()),
        coordinates: pairs(record.coordinates()),
        partition: record.partition(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_record() -> RouteRecord {
        RouteRecord {
            route: "orders".into(),
            position: 42,
            timestamp_ms: Some(1_700_000_000_000),
            write_timestamp_us: Some(1_700_000_000_000_123),
            key: Some(b"k".to_vec()),
            payload: None,
            headers: vec![("tenant".into(), "acme".into())],
            coordinates: vec![("shardgate.source.subject".into(), "orders.created".into())],
            partition: None,
        }
    }

    fn encode(record: &RouteRecord) -> Vec<u8> {
        encode_route(
            &record.route,
            record.position,
            record.timestamp_ms,
            record.write_timestamp_us.unwrap_or_default(),
            record.key.as_deref(),
            record.payload.as_deref(),
            record.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            record.coordinates.iter().map(|(n, v)| (n.as_str(), v.as_str())),
            record.partition,
        )
    }

    #[test]
    fn route_records_round_trip_every_field() {
        let record = route_record();
        let bytes = encode(&record);
        assert_eq!(bytes[0], KIND_ROUTE);
        assert_eq!(
            decode(&bytes),
            Ok(Record::Route(record)),
            "a tombstone stays a tombstone"
        );
        assert!(decode(b"garbage!").is_err());
        assert!(decode(&[]).is_err());
        assert!(decode(&[3, 0, 0, 0]).is_err(), "an unknown kind is refused");
    }

    #[test]
    fn grpc_records_hold_the_protobuf_bytes_once() {
        let batch = crate::wire::proto::RowBatch {
            table: "ks.t".into(),
            columns: vec!["id".into()],
            rows: Vec::new(),
            timestamp_us: 7,
        };
        let bytes = encode_grpc(&batch);
        assert_eq!(bytes[0], KIND_GRPC);
        assert_eq!(&bytes[1..], prost::Message::encode_to_vec(&batch).as_slice());
        assert_eq!(decode(&bytes), Ok(Record::Grpc(bytes[1..].to_vec())));
    }

    /// Spools written before the kind byte still replay: a bare FlatBuffers record is a route's
    /// message, and route "" the gRPC batch in its payload.
    #[test]
    fn records_without_a_kind_byte_still_decode() {
        let record = route_record();
        let legacy = encode(&record)[1..].to_vec();
        assert_eq!(legacy[0] % 4, 0, "a FlatBuffers root offset is 4-aligned");
        assert_eq!(decode(&legacy), Ok(Record::Route(record)));
        let grpc = RouteRecord {
            route: String::new(),
            payload: Some(vec![10, 4, 107, 115, 46, 116]),
            ..RouteRecord::default()
        };
        let legacy = encode(&grpc)[1..].to_vec();
        assert_eq!(decode(&legacy), Ok(Record::Grpc(vec![10, 4, 107, 115, 46, 116])));
    }
}
