//! A query job's `SELECT` read as a table scan when it is one — plain columns (or `*`) of one
//! table, restrictions that hold row by row, nothing that spans token ranges (`DISTINCT`,
//! `JSON`, functions or aggregates among the selectors, `LIMIT`, `ORDER BY`, `GROUP BY`,
//! `PER PARTITION LIMIT`, a `token(…)` restriction) and no restriction on the partition key —
//! so the job is planned into the table's shard-aligned splits like a scan job, each split
//! claimed, leased and resumed on its own, instead of read as one paged statement. Pure.

/// A `SELECT` as the scan it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOf {
    /// `keyspace.table`.
    pub table: String,
    /// Columns read (empty: `*`).
    pub columns: Vec<String>,
    /// The restrictions, as written (empty: none).
    pub r#where: String,
    /// `ALLOW FILTERING` was given.
    pub allow_filtering: bool,
}

/// Words that make a statement span token ranges (or read them in an order of its own).
const SPANNING: &[&str] = &["LIMIT", "ORDER", "GROUP", "PER", "TOKEN", "DISTINCT", "JSON"];

/// `cql` upper-cased (ASCII), with the ASCII inside every string literal blanked (keywords in
/// them are text): the same byte length as `cql`.
fn masked(cql: &str) -> String {
    let mut in_string = false;
    cql.chars()
        .map(|c| match c {
            '\'' => {
                in_string = !in_string;
                c
            }
            _ if in_string && c.is_ascii() => ' ',
            _ => c.to_ascii_uppercase(),
        })
        .collect()
}

/// Byte offset of the word `word` (upper-case) in `masked`, as a whole word, from `from` on.
fn word_at(masked: &str, word: &str, from: usize) -> Option<usize> {
    let bytes = masked.as_bytes();
    let boundary = |i: usize| i >= bytes.len() || !(bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_');
    let mut start = from;
    while let Some(found) = masked.get(start..)?.find(word) {
        let at = start + found;
        if (at == 0 || boundary(at - 1)) && boundary(at + word.len()) {
            return Some(at);
        }
        start = at + word.len();
    }
    None
}

fn identifier(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic()) && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The scan `cql` is, if it is one (see the module's words); `None` reads it as one statement.
pub fn scan_of(cql: &str) -> Option<ScanOf> {
    let cql = cql.trim().trim_end_matches(';').trim_end();
    let upper = masked(cql);
    if !upper.starts_with("SELECT") || SPANNING.iter().any(|word| word_at(&upper, word, 0).is_some()) {
        return None;
    }
    let from = word_at(&upper, "FROM", 0)?;
    let selectors = cql.get("SELECT".len()..from)?.trim();
    let columns = if selectors == "*" {
        Vec::new()
    } else {
        selectors
            .split(',')
            .map(|column| identifier(column.trim()).then(|| column.trim().to_ascii_lowercase()))
            .collect::<Option<Vec<_>>>()?
    };
    let after_from = from + "FROM".len();
    let rest = cql.get(after_from..)?.trim_start();
    let table_len = rest.find(char::is_whitespace).unwrap_or(rest.len());
    let table = &rest[..table_len];
    let (keyspace, name) = table.split_once('.')?;
    if !identifier(keyspace) || !identifier(name) {
        return None;
    }
    let tail_at = cql.len() - rest.len() + table_len;
    let mut tail_end = cql.len();
    let mut allow_filtering = false;
    if let Some(allow) = word_at(&upper, "ALLOW", tail_at) {
        if upper[allow + "ALLOW".len()..].trim() != "FILTERING" {
            return None;
        }
        allow_filtering = true;
        tail_end = allow;
    }
    let tail = cql[tail_at..tail_end].trim();
    let r#where = if tail.is_empty() {
        String::new()
    } else {
        let upper_tail = masked(tail);
        if word_at(&upper_tail, "WHERE", 0) != Some(0) {
            return None;
        }
        tail["WHERE".len()..].trim().to_string()
    };
    Some(ScanOf {
        table: format!("{}.{}", keyspace.to_ascii_lowercase(), name.to_ascii_lowercase()),
        columns,
        r#where,
        allow_filtering,
    })
}

/// Whether `restrictions` name one of the `partition_key` columns (such a statement reads
/// given partitions: it is not split into token ranges).
pub fn restricts(restrictions: &str, partition_key: &[String]) -> bool {
    let upper = masked(restrictions);
    partition_key
        .iter()
        .any(|column| word_at(&upper, &column.to_ascii_uppercase(), 0).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_selects_are_scans_and_spanning_ones_are_not() {
        let scan = scan_of("SELECT status, Amount FROM Shop.orders WHERE status = ? ALLOW FILTERING;").expect("a scan");
        assert_eq!(
            scan,
            ScanOf {
                table: "shop.orders".into(),
                columns: vec!["status".into(), "amount".into()],
                r#where: "status = ?".into(),
                allow_filtering: true,
            }
        );
        assert_eq!(
            scan_of("select * from shop.orders"),
            Some(ScanOf {
                table: "shop.orders".into(),
                columns: Vec::new(),
                r#where: String::new(),
                allow_filtering: false,
            })
        );
        // A keyword inside a string literal is text.
        let quoted = scan_of("SELECT id FROM ks.t WHERE note = 'order by limit' ALLOW FILTERING").expect("a scan");
        assert_eq!(quoted.r#where, "note = 'order by limit'");
        for spanning in [
            "SELECT id FROM ks.t LIMIT 10",
            "SELECT id FROM ks.t WHERE a = 1 ORDER BY b",
            "SELECT a, count(*) FROM ks.t GROUP BY a",
            "SELECT id FROM ks.t PER PARTITION LIMIT 1",
            "SELECT DISTINCT id FROM ks.t",
            "SELECT JSON id FROM ks.t",
            "SELECT id FROM ks.t WHERE token(id) > 0",
            "SELECT max(a) FROM ks.t",
            "SELECT id FROM t",
            "SELECT id FROM ks.t ALLOW",
            "SELECT id FROM ks.t junk",
            "UPDATE ks.t SET a = 1 WHERE id = 1",
        ] {
            assert_eq!(scan_of(spanning), None, "{spanning}");
        }
    }

    #[test]
    fn a_partition_key_restriction_is_found_as_a_whole_word() {
        let key = vec!["order_id".to_string()];
        assert!(restricts("order_id = ?", &key));
        assert!(restricts("status = 'x' AND ORDER_ID IN (1, 2)", &key));
        assert!(!restricts("order_ids = ?", &key));
        assert!(!restricts("note = 'order_id'", &key));
        assert!(!restricts("", &key));
    }
}
