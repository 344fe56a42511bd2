//! Hostile input against every RPC request type (property tests only): arbitrary bytes as each
//! request message, and arbitrary typed values against every column type, go through the same
//! decoding and conversion the services run — prost's decode, the FlatBuffers decoder, row
//! binding against a table of every writable column type, page-token opening — and are either
//! taken or refused, never panicked on; and values serialized straight from protobuf match the
//! driver's bytes. `PROPTEST_CASES=100000 cargo test --release --lib
//! hostile` is the longer run.

use proptest::prelude::*;
use prost::Message;
use scylla::cluster::metadata::{CollectionType, ColumnType, NativeType};
use scylla::serialize::value::SerializeValue;
use scylla::serialize::writers::CellWriter;

use crate::ingest::service::{bind_encoded_row, bind_row};
use crate::query::token::{FingerprintBuilder, Keys};
use crate::sink::scylla::bound::RowBuilder;
use crate::wire::convert::{to_cql, write_cell, ConvertError};
use crate::wire::flat::decode_row_batch;
use crate::wire::proto::{
    ExecuteRequest, GetRequest, GetTopologyRequest, JobRequest, ListJobsRequest, PlanScanRequest, Row, RowBatch,
    ScanRequest, WriteFlatRequest, WriteRequest, WriteStreamRequest,
};

/// Every native type, and collections of them (frozen and not, nested).
fn column_types() -> Vec<ColumnType<'static>> {
    use NativeType::*;
    let natives = [
        Ascii, Boolean, Blob, Counter, Date, Decimal, Double, Duration, Float, Int, BigInt, Text, Timestamp, Inet,
        SmallInt, TinyInt, Time, Timeuuid, Uuid, Varint,
    ];
    let mut types: Vec<ColumnType<'static>> = natives.into_iter().map(ColumnType::Native).collect();
    let collection = |frozen, typ| ColumnType::Collection { frozen, typ };
    types.push(collection(
        false,
        CollectionType::List(Box::new(ColumnType::Native(Int))),
    ));
    types.push(collection(
        true,
        CollectionType::Set(Box::new(ColumnType::Native(Text))),
    ));
    types.push(collection(
        false,
        CollectionType::Map(
            Box::new(ColumnType::Native(Text)),
            Box::new(collection(
                true,
                CollectionType::List(Box::new(ColumnType::Native(Double))),
            )),
        ),
    ));
    types
}

fn column_names(types: &[ColumnType<'static>]) -> Vec<String> {
    (0..types.len()).map(|i| format!("c{i}")).collect()
}

/// Binds every encoded row of `batch` as the ingest service would, against a table of every
/// type.
fn bind_encoded_batch(batch: &crate::wire::raw::RowBatch) {
    let types = column_types();
    let names = column_names(&types);
    let mut builder = RowBuilder::default();
    for row in &batch.rows {
        let _ = bind_encoded_row(&names, &types, &[0], row, batch.timestamp_us, &mut builder);
    }
}

/// `values` as one encoded `shardgate.v1.Row`.
fn encoded_row(values: Vec<crate::wire::proto::Value>) -> Vec<u8> {
    Row { values }.encode_to_vec()
}

/// Binds `encoded` and its decoded form against every column type at each position; both
/// must give the same cells or the same refusal.
fn both_bindings_agree(encoded: &[u8], decoded: &Row) -> Result<(), TestCaseError> {
    let types = column_types();
    let names = column_names(&types);
    for rotation in [0, 7, 19] {
        let mut rotated = types.clone();
        rotated.rotate_left(rotation % types.len());
        let mut builder = RowBuilder::default();
        let from_bytes =
            bind_encoded_row(&names, &rotated, &[0], encoded, 5, &mut builder).map(|span| builder.single(span));
        let from_row = bind_row(&names, &rotated, &[0], decoded, 5, &mut builder).map(|span| builder.single(span));
        prop_assert_eq!(from_bytes, from_row, "{:?}", decoded);
    }
    // Each value alone against each type, nullable (a whole row stops at its first refusal).
    for value in decoded.values.iter().take(4) {
        let alone = Row {
            values: vec![value.clone()],
        };
        let encoded = alone.encode_to_vec();
        for typ in &types {
            let types = std::slice::from_ref(typ);
            let mut builder = RowBuilder::default();
            let from_bytes =
                bind_encoded_row(&names, types, &[], &encoded, 5, &mut builder).map(|span| builder.single(span));
            let from_row = bind_row(&names, types, &[], &alone, 5, &mut builder).map(|span| builder.single(span));
            prop_assert_eq!(from_bytes, from_row, "{:?} as {:?}", value, typ);
        }
    }
    Ok(())
}

/// Binds every row of `batch` as the ingest service would, against a table of every type.
fn bind_batch(batch: &RowBatch) {
    let types = column_types();
    let names = column_names(&types);
    let mut builder = RowBuilder::default();
    for row in &batch.rows {
        let _ = bind_row(&names, &types, &[0], row, batch.timestamp_us, &mut builder);
    }
}

proptest! {
    /// Arbitrary bytes as each request message: decoded or refused; what decodes goes on
    /// through row binding, the FlatBuffers decoder and page-token opening without a panic.
    #[test]
    fn arbitrary_bytes_as_any_request_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let bytes = bytes.as_slice();
        if let Ok(request) = WriteRequest::decode(bytes) {
            if let Some(batch) = &request.batch { bind_batch(batch); }
        }
        if let Ok(request) = crate::wire::server_view::WriteRequest::decode(bytes) {
            if let Some(batch) = &request.batch { bind_encoded_batch(batch); }
        }
        if let Ok(request) = crate::wire::server_view::WriteStreamRequest::decode(bytes) {
            if let Some(batch) = &request.batch { bind_encoded_batch(batch); }
        }
        if let Ok(request) = WriteFlatRequest::decode(bytes) {
            if let Ok(batch) = decode_row_batch(&request.row_batch) { bind_batch(&batch); }
        }
        if let Ok(request) = WriteStreamRequest::decode(bytes) {
            if let Some(batch) = &request.batch { bind_batch(batch); }
            if let Ok(batch) = decode_row_batch(&request.flat_batch) { bind_batch(&batch); }
        }
        let keys = Keys::new(vec![3; 32]);
        let fingerprint = FingerprintBuilder::new("execute").finish();
        if let Ok(request) = GetRequest::decode(bytes) {
            for (value, typ) in request.key.iter().zip(column_types().iter().cycle()) {
                let _ = to_cql(value, typ);
            }
        }
        if let Ok(request) = ExecuteRequest::decode(bytes) {
            if let Some(options) = &request.options {
                prop_assert!(keys.open(&fingerprint, &options.page_token).is_err(), "a forged page token opened");
            }
            for (value, typ) in request.values.iter().zip(column_types().iter().cycle()) {
                let _ = to_cql(value, typ);
            }
        }
        if let Ok(request) = ScanRequest::decode(bytes) {
            for token in &request.resume {
                prop_assert!(keys.open(&fingerprint, token).is_err(), "a forged resume token opened");
            }
            for (value, typ) in request.values.iter().zip(column_types().iter().cycle()) {
                let _ = to_cql(value, typ);
            }
        }
        let _ = PlanScanRequest::decode(bytes);
        let _ = JobRequest::decode(bytes);
        let _ = ListJobsRequest::decode(bytes);
        let _ = GetTopologyRequest::decode(bytes);
    }

    /// Any typed value against any column type converts or is refused with a reason.
    #[test]
    fn any_value_against_any_column_type_converts_or_is_refused(value in crate::wire::flat::tests::value()) {
        for typ in column_types() {
            if let Err(error) = to_cql(&value, &typ) {
                prop_assert!(!error.0.is_empty());
            }
        }
    }

    /// Any typed value against any column type is serialized straight to the bytes the
    /// driver gives for its converted CQL value, or refused with the conversion's own error.
    #[test]
    fn values_serialize_straight_to_the_drivers_bytes(value in crate::wire::flat::tests::value()) {
        for typ in column_types() {
            let mut direct = vec![7];
            let written = write_cell(&value, &typ, &mut direct);
            let mut through_cql = vec![7];
            let converted = to_cql(&value, &typ).and_then(|cql| match cql {
                None => {
                    CellWriter::new(&mut through_cql).set_null();
                    Ok(())
                }
                Some(cql) => cql
                    .serialize(&typ, CellWriter::new(&mut through_cql))
                    .map(|_| ())
                    .map_err(|e| ConvertError(e.to_string())),
            });
            match (written, converted) {
                (Ok(()), Ok(())) => prop_assert_eq!(&direct, &through_cql, "{:?} as {:?}", value, typ),
                (Err(direct_error), Err(error)) => {
                    prop_assert_eq!(direct_error, error);
                    prop_assert_eq!(&direct, &vec![7], "a refused value left bytes behind");
                }
                (written, converted) => prop_assert!(false, "{value:?} as {typ:?}: direct {written:?}, through CQL {converted:?}"),
            }
        }
    }

    /// A row kept encoded binds to exactly the cells (or the refusal) its decoded form does,
    /// for any values against every column type.
    #[test]
    fn encoded_rows_bind_as_their_decoded_rows(values in proptest::collection::vec(crate::wire::flat::tests::value(), 0..30)) {
        let row = Row { values };
        both_bindings_agree(&row.encode_to_vec(), &row)?;
    }

    /// Encodings prost merges (a value's fields given twice, a row given in two pieces) bind
    /// as prost decodes them.
    #[test]
    fn merged_encodings_bind_as_prost_decodes_them(
        first in proptest::collection::vec(crate::wire::flat::tests::value(), 1..4),
        second in proptest::collection::vec(crate::wire::flat::tests::value(), 1..4),
    ) {
        // One value field holding two encoded values back to back.
        let mut merged_value = first[0].encode_to_vec();
        merged_value.extend(second[0].encode_to_vec());
        let mut encoded = Vec::new();
        prost::encoding::bytes::encode(1, &merged_value, &mut encoded);
        // Then two rows' encodings back to back: one row of their values.
        encoded.extend(encoded_row(first));
        encoded.extend(encoded_row(second));
        let decoded = Row::decode(encoded.as_slice()).expect("concatenated messages decode");
        both_bindings_agree(&encoded, &decoded)?;
    }

    /// Arbitrary bytes as an encoded row: bound as prost decodes them, or refused when prost
    /// cannot decode them; never panicked on.
    #[test]
    fn arbitrary_bytes_as_a_row_bind_as_prost_decodes_them(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        match Row::decode(bytes.as_slice()) {
            Ok(decoded) => both_bindings_agree(&bytes, &decoded)?,
            Err(_) => {
                let types = column_types();
                let names = column_names(&types);
                let bound = bind_encoded_row(&names, &types, &[0], &bytes, 5, &mut RowBuilder::default());
                prop_assert!(bound.is_err(), "bytes prost refuses were bound");
            }
        }
    }

    /// Rows of any values, of any length, bind or are refused naming a column.
    #[test]
    fn any_row_binds_or_is_refused(values in proptest::collection::vec(crate::wire::flat::tests::value(), 0..30)) {
        let types = column_types();
        let names = column_names(&types);
        if let Err((_, reason)) = bind_row(&names, &types, &[0], &Row { values }, 0, &mut RowBuilder::default()) {
            prop_assert!(!reason.is_empty());
        }
    }

    /// Arbitrary bytes as a page token are refused, never opened, never panicked on.
    #[test]
    fn arbitrary_page_tokens_are_refused(token in proptest::collection::vec(any::<u8>(), 0..128)) {
        let keys = Keys::new(vec![9; 32]);
        prop_assert!(keys.open(&FingerprintBuilder::new("scan").finish(), &token).is_err());
    }
}
