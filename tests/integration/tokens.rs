//! The write engine's token ([`shardgate::sink::scylla::writer::row_token`], from the partition
//! key alone) against the driver's `PreparedStatement::calculate_token` (the whole row
//! serialized), on statements prepared by the real Cassandra: single and composite partition
//! keys of several types, key columns bound out of key order, clustering columns between them;
//! for rows bound as CQL values and the same rows bound serialized (as the ingest API binds).

use scylla::serialize::value::SerializeValue;
use scylla::serialize::writers::CellWriter;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, MaybeUnset};
use shardgate::devkit;
use shardgate::sink::scylla::bound::{RowBuilder, SerializedRow};
use shardgate::sink::scylla::writer::row_token;
use shardgate::sink::scylla::RowValues;

use crate::Names;

/// Rows per statement.
const ROWS: u64 = 2_000;

fn set(value: CqlValue) -> MaybeUnset<Option<CqlValue>> {
    MaybeUnset::Set(Some(value))
}

/// A deterministic spread of values (no randomness to reproduce): a splitmix64 step.
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `values` serialized cell by cell for `statement`'s markers.
fn serialized(statement: &PreparedStatement, values: &RowValues, builder: &mut RowBuilder) -> SerializedRow {
    builder.start();
    for (value, spec) in values.iter().zip(statement.get_variable_col_specs().iter()) {
        let cell = builder.cell().expect("room for the cell");
        value
            .serialize(spec.typ(), CellWriter::new(cell))
            .expect("the value fits its marker");
    }
    let span = builder.finish().expect("whole cells");
    builder.single(span)
}

/// Compares both tokens on `ROWS` rows of `statement`, built by `row`, bound as CQL values and
/// serialized; returns how many distinct tokens were seen (so a constant token cannot pass).
fn compare(statement: &PreparedStatement, row: impl Fn(u64) -> RowValues) -> usize {
    let mut tokens = std::collections::BTreeSet::new();
    let mut builder = RowBuilder::default();
    for i in 0..ROWS {
        let values = row(i);
        let driver = statement
            .calculate_token(&values)
            .expect("the driver computes the token")
            .expect("token-aware statement")
            .value();
        assert_eq!(row_token(statement, &values), Some(driver), "row {i}: {values:?}");
        let cells = serialized(statement, &values, &mut builder);
        assert_eq!(
            row_token(statement, &cells),
            Some(driver),
            "row {i} serialized: {cells:?}"
        );
        let driver_on_cells = statement
            .calculate_token(&cells)
            .expect("the driver serializes the cells")
            .map(|token| token.value());
        assert_eq!(
            driver_on_cells,
            Some(driver),
            "row {i}: the driver reads the cells as the values"
        );
        tokens.insert(driver);
    }
    tokens.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_tokens_match_the_driver() {
    let names = Names::new("row_tokens");
    let session = devkit::connect(devkit::CASSANDRA).await.expect("Cassandra is up");
    let keyspace = &names.keyspace;
    devkit::recreate_keyspace_with(
        &session,
        keyspace,
        format!("CREATE TABLE {keyspace}.single (id text PRIMARY KEY, n bigint)"),
    )
    .await
    .expect("keyspace");
    session
        .query_unpaged(
            format!(
                "CREATE TABLE {keyspace}.composite (tenant int, day date, device uuid, seq bigint, \
                 reading double, PRIMARY KEY ((tenant, device, day), seq))"
            ),
            &[],
        )
        .await
        .expect("composite table");
    session.await_schema_agreement().await.expect("schema agreement");

    let single = session
        .prepare(format!(
            "INSERT INTO {keyspace}.single (n, id) VALUES (?, ?) USING TIMESTAMP ?"
        ))
        .await
        .expect("prepare single");
    let distinct = compare(&single, |i| {
        vec![
            set(CqlValue::BigInt(i as i64)),
            set(CqlValue::Text(format!("order-{:x}", mix(i)))),
            set(CqlValue::BigInt(1)),
        ]
    });
    assert_eq!(distinct as u64, ROWS, "single key: every row its own token");

    // Bound out of key order, a clustering column in between.
    let composite = session
        .prepare(format!(
            "INSERT INTO {keyspace}.composite (day, seq, reading, device, tenant) VALUES (?, ?, ?, ?, ?)"
        ))
        .await
        .expect("prepare composite");
    let distinct = compare(&composite, |i| {
        let m = mix(i);
        vec![
            set(CqlValue::Date(scylla::value::CqlDate((1 << 31) + (m % 3650) as u32))),
            set(CqlValue::BigInt(i as i64)),
            set(CqlValue::Double(m as f64 / 7.0)),
            set(CqlValue::Uuid(uuid::Uuid::from_u64_pair(m, i))),
            set(CqlValue::Int((m % 1000) as i32)),
        ]
    });
    assert_eq!(distinct as u64, ROWS, "composite key: every row its own token");
}
