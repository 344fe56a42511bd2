//! CQL text of the writes: inserts and deletes with every value bound and the write timestamp
//! bound too, identifiers quoted. Pure; used at start-up and when the ingest API prepares a
//! writer for a new (table, column list).

/// `INSERT INTO "keyspace"."table" ("c1", ...) VALUES (?, ...) USING TIMESTAMP ?`: identifiers
/// quoted (embedded quotes doubled), every value bound, the write timestamp bound last.
pub fn insert_statement<'a>(keyspace: &str, table: &str, columns: impl IntoIterator<Item = &'a str>) -> String {
    let quote = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let names: Vec<String> = columns.into_iter().map(quote).collect();
    let markers = vec!["?"; names.len()].join(", ");
    format!(
        "INSERT INTO {}.{} ({}) VALUES ({markers}) USING TIMESTAMP ?",
        quote(keyspace),
        quote(table),
        names.join(", ")
    )
}

/// `DELETE FROM "keyspace"."table" USING TIMESTAMP ? WHERE "k1" = ? AND ...`: the write
/// timestamp bound first, then the primary key columns.
pub fn delete_statement<'a>(keyspace: &str, table: &str, key_columns: impl IntoIterator<Item = &'a str>) -> String {
    let quote = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let conditions: Vec<String> = key_columns.into_iter().map(|c| format!("{} = ?", quote(c))).collect();
    format!(
        "DELETE FROM {}.{} USING TIMESTAMP ? WHERE {}",
        quote(keyspace),
        quote(table),
        conditions.join(" AND ")
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn insert_statement_quotes_identifiers_and_binds_the_timestamp() {
        assert_eq!(
            super::insert_statement("ks", "t", ["a", "b\"c"]),
            "INSERT INTO \"ks\".\"t\" (\"a\", \"b\"\"c\") VALUES (?, ?) USING TIMESTAMP ?"
        );
    }
}
