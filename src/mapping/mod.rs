//! Formats and field → column mapping.
//!
//! A [`RouteMapper`] is built once per route at start-up from the route config, the tables'
//! schemas read from the cluster ([`RouteMapper::new`] refuses unknown columns and unmapped
//! primary key columns) and the format's decoder (Protobuf descriptors are loaded then). On the
//! data plane it turns one message into rows — an upsert or a delete for each target table the
//! message goes to — on the core that received it; it is pure and never panics on input.
//!
//! Value rules: a field that is absent leaves its column UNSET (a partial update, never a null
//! overwrite); JSON `null` writes a null; primary-key columns must be present and non-null.
//! A message with no payload (Kafka tombstone) deletes its rows, keyed from `$key`, headers or
//! metadata; `delete_when` turns any message into a delete. `filter` skips messages, `when`
//! picks target tables, `table_from` names the one target per message, computed columns are CEL
//! expressions ([`expr`]). TTL and the write timestamp may come from fields.

pub mod coerce;
mod error;
pub mod expr;
pub mod format;
mod project;
mod reason;

pub use error::{MappingError, SchemaError};
pub use reason::ReasonCode;

use scylla::cluster::metadata::{ColumnType, NativeType};
use scylla::value::{CqlValue, MaybeUnset};
use serde_json::Value;

use self::coerce::Json;
use self::expr::{Bound, Expr, Variables};
use self::format::Decoder;
use self::project::{Projected, Projection};
use crate::config::{ColumnMapping, FieldRef, RouteConfig, TargetConfig, TimeUnit, TtlConfig};
use crate::sink::scylla::bound::{put, RowBuilder, RowSpan};
use crate::sink::scylla::schema::warn_replay_unsafe_columns;
use crate::sink::scylla::schema::{RowValues, TableSchema};
use crate::sink::scylla::statement::{delete_statement, insert_statement};

/// Where one value comes from, with expressions compiled.
#[derive(Debug)]
enum ValueSource {
    /// A field reference other than an expression.
    Field(FieldRef),
    /// A computed value.
    Expr(Box<Expr>),
}

impl ValueSource {
    fn new(route: &str, key: String, field: FieldRef) -> Result<ValueSource, SchemaError> {
        match field {
            FieldRef::Expr(source) => compile(route, key, &source).map(|e| ValueSource::Expr(Box::new(e))),
            other => Ok(ValueSource::Field(other)),
        }
    }

    fn label(&self) -> String {
        match self {
            ValueSource::Field(field) => field.to_string(),
            ValueSource::Expr(expr) => format!("expr `{}`", expr.source()),
        }
    }

    fn reads_payload(&self) -> bool {
        matches!(
            self,
            ValueSource::Expr(_) | ValueSource::Field(FieldRef::Path(_) | FieldRef::Payload)
        )
    }
}

fn compile(route: &str, key: String, source: &str) -> Result<Expr, SchemaError> {
    Expr::compile(source).map_err(|reason| SchemaError::Expression {
        route: route.to_string(),
        key,
        reason,
    })
}

/// One column of a target's statements.
#[derive(Debug)]
struct BoundColumn {
    name: String,
    typ: ColumnType<'static>,
    source: ValueSource,
    /// `columns.<name>` or `target[i].columns.<name>`, for expression errors.
    key: String,
    /// Where a projected document keeps this column's path, resolved once at start-up.
    slots: Option<Box<[usize]>>,
}

/// One table a route writes to: its columns in bind order and its primary key.
#[derive(Debug)]
pub struct TargetMapper {
    /// Keyspace.
    pub keyspace: String,
    /// Table.
    pub table: String,
    when: Option<(String, Expr)>,
    columns: Vec<BoundColumn>,
    /// Indexes into `columns` of the partition key then clustering columns, in table order.
    primary_key: Vec<usize>,
}

impl TargetMapper {
    fn new(
        route: &RouteConfig,
        index: usize,
        target: &TargetConfig,
        table: &TableSchema,
    ) -> Result<TargetMapper, SchemaError> {
        let table_name = target.qualified();
        warn_replay_unsafe_columns(&target.keyspace, &target.table, table);
        let prefix = if route.targets.len() > 1 {
            format!("target[{index}].")
        } else {
            String::new()
        };
        let mappings: Vec<ColumnMapping> = if target.columns.is_empty() {
            let mut names: Vec<&String> = table.columns.keys().collect();
            names.sort();
            names
                .into_iter()
                .map(|name| ColumnMapping {
                    column: name.clone(),
                    field: FieldRef::Path(vec![name.clone()]),
                })
                .collect()
        } else {
            target.columns.clone()
        };
        let columns = mappings
            .into_iter()
            .map(|mapping| bind_column(&route.name, &table_name, &prefix, table, mapping))
            .collect::<Result<Vec<_>, _>>()?;
        // An upsert binds the columns, a TTL and the write timestamp; CQL binds at most 65,535.
        if columns.len() + 2 > usize::from(u16::MAX) {
            return Err(SchemaError::Targets {
                route: route.name.clone(),
                reason: format!("`{table_name}` maps {} columns; {TOO_MANY_VALUES}", columns.len()),
            });
        }
        let mut primary_key = Vec::new();
        for key_column in table.partition_key.iter().chain(&table.clustering_key) {
            let Some(position) = columns.iter().position(|c| &c.name == key_column) else {
                return Err(SchemaError::PrimaryKeyUnmapped {
                    route: route.name.clone(),
                    table: table_name,
                    column: key_column.clone(),
                });
            };
            primary_key.push(position);
        }
        let when = match &target.when {
            Some(source) => {
                let key = format!("{prefix}when");
                Some((key.clone(), compile(&route.name, key, source)?))
            }
            None => None,
        };
        Ok(TargetMapper {
            keyspace: target.keyspace.clone(),
            table: target.table.clone(),
            when,
            columns,
            primary_key,
        })
    }

    /// Column names in bind order.
    pub fn column_names(&self) -> impl Iterator<Item = &str> {
        self.columns.iter().map(|c| c.name.as_str())
    }

    /// `keyspace.table`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.keyspace, self.table)
    }
}

/// A mapped column checked against its table: present, of a type a message can fill.
fn bind_column(
    route: &str,
    table_name: &str,
    prefix: &str,
    table: &TableSchema,
    mapping: ColumnMapping,
) -> Result<BoundColumn, SchemaError> {
    let Some((typ, _)) = table.columns.get(&mapping.column) else {
        let mut available: Vec<&str> = table.columns.keys().map(String::as_str).collect();
        available.sort_unstable();
        return Err(SchemaError::ColumnNotFound {
            route: route.to_string(),
            table: table_name.to_string(),
            column: mapping.column,
            available: format!("`{}`", available.join("`, `")),
        });
    };
    if matches!(
        typ,
        ColumnType::Native(NativeType::Counter) | ColumnType::Native(NativeType::Duration)
    ) {
        return Err(SchemaError::UnsupportedColumn {
            route: route.to_string(),
            column: mapping.column,
            typ: format!("{typ:?}"),
        });
    }
    let key = format!("{prefix}columns.{}", mapping.column);
    Ok(BoundColumn {
        source: ValueSource::new(route, key.clone(), mapping.field)?,
        name: mapping.column,
        typ: typ.clone(),
        key,
        slots: None,
    })
}

/// One row a message becomes: an upsert or a delete of one target table.
#[derive(Debug)]
pub struct MappedRow<V = RowValues> {
    /// Index of the target in [`RouteMapper::targets`].
    pub target: usize,
    /// A delete (bound to the target's delete statement) rather than an upsert.
    pub delete: bool,
    /// Bound values, in the order of the statement (see [`RouteMapper::upsert_statement`] and
    /// [`RouteMapper::delete_statement`]): CQL values ([`RouteMapper::map`]) or where the
    /// row's serialized cells are ([`RouteMapper::map_cells`]).
    pub values: V,
}

/// Where a message's bound values go, one row at a time: CQL values, or serialized cells in a
/// [`RowBuilder`]. Values come in statement order, between [`RowOutput::start`] and
/// [`RowOutput::finish`].
trait RowOutput {
    /// A finished row.
    type Row;
    /// Starts a row of `values` values, dropping whatever an unfinished one left.
    fn start(&mut self, values: usize);
    /// A value for a column of `typ`, coerced to it.
    fn value(&mut self, value: Json<'_>, typ: &ColumnType<'_>) -> Result<(), coerce::CoerceError>;
    /// A `blob` column's bytes.
    fn blob(&mut self, bytes: &[u8]) -> Result<(), coerce::CoerceError>;
    /// A null.
    fn null(&mut self);
    /// Unset: the column keeps what it holds.
    fn unset(&mut self);
    /// An `int` (the TTL).
    fn int(&mut self, value: i32);
    /// A `bigint` (the write timestamp).
    fn bigint(&mut self, value: i64);
    /// Ends the row; `None` when it holds more values than a statement can bind.
    fn finish(&mut self) -> Option<Self::Row>;
}

/// Rows of CQL values ([`RouteMapper::map`]).
#[derive(Default)]
struct CqlOutput {
    values: RowValues,
}

impl RowOutput for CqlOutput {
    type Row = RowValues;

    fn start(&mut self, values: usize) {
        self.values = Vec::with_capacity(values);
    }

    fn value(&mut self, value: Json<'_>, typ: &ColumnType<'_>) -> Result<(), coerce::CoerceError> {
        let value = coerce::coerce_json(value, typ)?;
        self.values.push(MaybeUnset::Set(Some(value)));
        Ok(())
    }

    fn blob(&mut self, bytes: &[u8]) -> Result<(), coerce::CoerceError> {
        self.values.push(MaybeUnset::Set(Some(CqlValue::Blob(bytes.to_vec()))));
        Ok(())
    }

    fn null(&mut self) {
        self.values.push(MaybeUnset::Set(None));
    }

    fn unset(&mut self) {
        self.values.push(MaybeUnset::Unset);
    }

    fn int(&mut self, value: i32) {
        self.values.push(MaybeUnset::Set(Some(CqlValue::Int(value))));
    }

    fn bigint(&mut self, value: i64) {
        self.values.push(MaybeUnset::Set(Some(CqlValue::BigInt(value))));
    }

    fn finish(&mut self) -> Option<RowValues> {
        Some(std::mem::take(&mut self.values))
    }
}

/// Rows of serialized cells in one buffer ([`RouteMapper::map_cells`]).
struct CellOutput<'b> {
    builder: &'b mut RowBuilder,
    /// A cell past the 65,535 a row can hold was refused.
    overflow: bool,
}

impl<'b> CellOutput<'b> {
    /// Rows written at the end of `builder`.
    fn new(builder: &'b mut RowBuilder) -> CellOutput<'b> {
        CellOutput {
            builder,
            overflow: false,
        }
    }

    /// The buffer to write the next cell at the end of; `None` past a row's 65,535 cells.
    fn cell(&mut self) -> Option<&mut Vec<u8>> {
        let cell = self.builder.cell().ok();
        self.overflow |= cell.is_none();
        cell
    }
}

/// CQL values and cells at once ([`RouteMapper::map_cells_and_values`]): one mapping for a
/// route whose rows a stream job's tap reads as values while they are written as cells.
struct BothOutput<'b> {
    values: CqlOutput,
    cells: CellOutput<'b>,
}

impl RowOutput for BothOutput<'_> {
    type Row = (RowValues, RowSpan);

    fn start(&mut self, values: usize) {
        self.values.start(values);
        self.cells.start(values);
    }

    /// Coerced once: the cell is the driver's serialization of the value the tap gets.
    fn value(&mut self, value: Json<'_>, typ: &ColumnType<'_>) -> Result<(), coerce::CoerceError> {
        let value = coerce::coerce_json(value, typ)?;
        if let Some(buffer) = self.cells.cell() {
            coerce::serialize_cell(&value, typ, buffer)?;
        }
        self.values.values.push(MaybeUnset::Set(Some(value)));
        Ok(())
    }

    fn blob(&mut self, bytes: &[u8]) -> Result<(), coerce::CoerceError> {
        self.values.blob(bytes)?;
        self.cells.blob(bytes)
    }

    fn null(&mut self) {
        self.values.null();
        self.cells.null();
    }

    fn unset(&mut self) {
        self.values.unset();
        self.cells.unset();
    }

    fn int(&mut self, value: i32) {
        self.values.int(value);
        self.cells.int(value);
    }

    fn bigint(&mut self, value: i64) {
        self.values.bigint(value);
        self.cells.bigint(value);
    }

    fn finish(&mut self) -> Option<(RowValues, RowSpan)> {
        Some((self.values.finish()?, self.cells.finish()?))
    }
}

/// More values than a statement binds (65,535); [`RouteMapper::new`] refuses targets that
/// could need them.
const TOO_MANY_VALUES: &str = "a row holds at most 65535 values";

impl RowOutput for CellOutput<'_> {
    type Row = RowSpan;

    fn start(&mut self, _: usize) {
        self.builder.start();
        self.overflow = false;
    }

    fn value(&mut self, value: Json<'_>, typ: &ColumnType<'_>) -> Result<(), coerce::CoerceError> {
        match self.cell() {
            Some(buffer) => coerce::write_cell(value, typ, buffer),
            None => Ok(()),
        }
    }

    fn blob(&mut self, bytes: &[u8]) -> Result<(), coerce::CoerceError> {
        let Some(buffer) = self.cell() else {
            return Ok(());
        };
        put(buffer, bytes).ok_or_else(|| coerce::CoerceError {
            reason: "the payload is larger than a CQL value can be (2 GiB)".into(),
        })
    }

    fn null(&mut self) {
        self.overflow |= self.builder.null().is_err();
    }

    fn unset(&mut self) {
        self.overflow |= self.builder.unset().is_err();
    }

    fn int(&mut self, value: i32) {
        self.overflow |= self.builder.int(value).is_err();
    }

    fn bigint(&mut self, value: i64) {
        self.overflow |= self.builder.bigint(value).is_err();
    }

    fn finish(&mut self) -> Option<RowSpan> {
        if self.overflow {
            return None;
        }
        self.builder.finish()
    }
}

/// What a mapper sees of one message.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// Message key.
    pub key: Option<&'a [u8]>,
    /// Payload; `None` for a tombstone.
    pub payload: Option<&'a [u8]>,
    /// Text headers or properties.
    pub headers: &'a [(String, String)],
    /// Topic, stream, queue, subject or endpoint.
    pub source: &'a str,
    /// The message's own subject (NATS, JetStream) or routing key (RabbitMQ).
    pub subject: Option<&'a str>,
    /// Kafka partition.
    pub partition: Option<i32>,
    /// Offset or sequence.
    pub position: i64,
    /// Message time, epoch milliseconds.
    pub timestamp_ms: Option<i64>,
}

/// A resolved value before coercion.
enum Found<'m> {
    Missing,
    /// Borrowed from the message or its decoded payload.
    Json(Json<'m>),
    /// Made for this message (metadata numbers, an expression's result).
    Owned(Value),
    Bytes(&'m [u8]),
}

impl Found<'_> {
    /// The JSON value found, if any.
    fn json(&self) -> Option<Json<'_>> {
        match self {
            Found::Json(json) => Some(*json),
            Found::Owned(value) => Some(value.into()),
            Found::Missing | Found::Bytes(_) => None,
        }
    }
}

/// A decoded payload: the whole document, or only the members the route reads (borrowing the
/// payload's text).
enum Decoded<'a> {
    Full(Value),
    Projected(&'a Projection, Projected<'a>),
}

impl Decoded<'_> {
    /// The value at a path of object keys; `None` when any step is absent or not an object.
    fn lookup(&self, parts: &[String]) -> Option<Json<'_>> {
        match self {
            Decoded::Full(document) => lookup(document, parts).map(Json::from),
            Decoded::Projected(projection, document) => projection.lookup(document, parts),
        }
    }
}

/// One message being mapped: the decoded document and what is derived from it lazily.
struct Message<'a, 'm> {
    envelope: &'a Envelope<'a>,
    document: &'m Decoded<'m>,
    key_document: std::cell::OnceCell<Option<Value>>,
    bound: std::cell::OnceCell<Bound>,
}

impl<'a, 'm> Message<'a, 'm> {
    fn bound(&self) -> &Bound {
        self.bound.get_or_init(|| {
            let key = self.envelope.key.and_then(|k| std::str::from_utf8(k).ok());
            // Expressions see the whole message: a route with any is never projected
            // (`projection_for`).
            debug_assert!(
                matches!(self.document, Decoded::Full(_)),
                "expression over a projection"
            );
            let msg = match self.document {
                Decoded::Full(document) => document,
                Decoded::Projected(..) => &Value::Null,
            };
            Bound::new(&Variables {
                msg,
                key,
                headers: self.envelope.headers,
                source: self.envelope.source,
                partition: self.envelope.partition,
                position: self.envelope.position,
                timestamp_ms: self.envelope.timestamp_ms,
            })
        })
    }

    fn condition(&self, key: &str, expr: &Expr) -> Result<bool, MappingError> {
        expr.is_true(self.bound()).map_err(|reason| MappingError::Expression {
            key: key.to_string(),
            source_text: expr.source().to_string(),
            reason,
        })
    }

    /// Resolves a value source; `column` names the column in errors.
    fn resolve(&self, source: &ValueSource, column: &str, key: &str) -> Result<Found<'_>, MappingError> {
        match source {
            ValueSource::Expr(expr) => {
                let value = expr.evaluate(self.bound()).map_err(|reason| MappingError::Expression {
                    key: key.to_string(),
                    source_text: expr.source().to_string(),
                    reason,
                })?;
                Ok(Found::Owned(value))
            }
            ValueSource::Field(field) => self.field(field, column),
        }
    }

    /// Resolves a field reference other than an expression; `column` names the column in
    /// errors.
    fn field(&self, field: &FieldRef, column: &str) -> Result<Found<'_>, MappingError> {
        let number = |n: i64| Found::Owned(Value::from(n));
        let found = match field {
            // An absent key is a missing value: only a primary-key column needs one (`bind`).
            FieldRef::Key | FieldRef::KeyPath(_) if self.envelope.key.is_none() => Found::Missing,
            FieldRef::Key => {
                let bytes = self.envelope.key.unwrap_or_default();
                let key_text = std::str::from_utf8(bytes).map_err(|_| MappingError::KeyNotText {
                    column: column.to_string(),
                    field: field.to_string(),
                    expected: "UTF-8 text",
                })?;
                Found::Json(Json::String(key_text))
            }
            FieldRef::KeyPath(parts) => {
                let document = self.key_document.get_or_init(|| {
                    self.envelope
                        .key
                        .and_then(|k| serde_json::from_slice::<Value>(k).ok())
                        .filter(Value::is_object)
                });
                let Some(document) = document else {
                    return Err(MappingError::KeyNotText {
                        column: column.to_string(),
                        field: field.to_string(),
                        expected: "a JSON object",
                    });
                };
                lookup(document, parts).map_or(Found::Missing, |v| Found::Json(v.into()))
            }
            FieldRef::Header(name) => self
                .envelope
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map_or(Found::Missing, |(_, v)| Found::Json(Json::String(v))),
            FieldRef::Source => Found::Json(Json::String(self.envelope.source)),
            FieldRef::Subject => self
                .envelope
                .subject
                .map_or(Found::Missing, |s| Found::Json(Json::String(s))),
            FieldRef::Partition => self.envelope.partition.map_or(Found::Missing, |p| number(i64::from(p))),
            FieldRef::Position => number(self.envelope.position),
            FieldRef::Timestamp => self.envelope.timestamp_ms.map_or(Found::Missing, number),
            FieldRef::Payload => self.envelope.payload.map_or(Found::Missing, Found::Bytes),
            FieldRef::Path(parts) => self.document.lookup(parts).map_or(Found::Missing, Found::Json),
            FieldRef::Expr(_) => Found::Missing,
        };
        Ok(found)
    }

    fn bind(&self, column: &BoundColumn, primary_key: bool, out: &mut impl RowOutput) -> Result<(), MappingError> {
        let found = match (&column.slots, self.document) {
            (Some(slots), Decoded::Projected(projection, document)) => {
                projection.at(document, slots).map_or(Found::Missing, Found::Json)
            }
            _ => self.resolve(&column.source, &column.name, &column.key)?,
        };
        let missing_key = || MappingError::MissingPrimaryKey {
            column: column.name.clone(),
            field: column.source.label(),
        };
        let bad = |reason: String| MappingError::BadValue {
            column: column.name.clone(),
            field: column.source.label(),
            reason,
        };
        let key_absent = || {
            self.envelope.key.is_none()
                && matches!(column.source, ValueSource::Field(FieldRef::Key | FieldRef::KeyPath(_)))
        };
        let value = match &found {
            Found::Missing if primary_key && key_absent() => {
                return Err(MappingError::KeyAbsent {
                    column: column.name.clone(),
                })
            }
            Found::Missing if primary_key => return Err(missing_key()),
            Found::Missing => {
                out.unset();
                return Ok(());
            }
            Found::Bytes(bytes) => match &column.typ {
                ColumnType::Native(NativeType::Blob) => return out.blob(bytes).map_err(|e| bad(e.reason)),
                _ => Json::String(std::str::from_utf8(bytes).map_err(|_| bad("the payload is not UTF-8 text".into()))?),
            },
            found => found.json().unwrap_or(Json::Null),
        };
        if value.is_null() {
            if primary_key {
                return Err(missing_key());
            }
            out.null();
            return Ok(());
        }
        out.value(value, &column.typ).map_err(|e| bad(e.reason))
    }
}

/// Turns messages of one route into rows for its target tables.
#[derive(Debug)]
pub struct RouteMapper {
    decoder: Decoder,
    /// JSON routes without expressions decode only the members they read.
    projection: Option<Projection>,
    targets: Vec<TargetMapper>,
    table_from: Option<FieldRef>,
    filter: Option<Expr>,
    delete_when: Option<Expr>,
    delete_on_tombstone: bool,
    ttl: Option<TtlConfig>,
    timestamp: Option<(FieldRef, TimeUnit)>,
}

/// Longest TTL CQL accepts: 20 years, in seconds.
const TTL_MAX_SECONDS: i64 = 630_720_000;

impl RouteMapper {
    /// Checks the route against its tables' schemas (`tables[i]` for `route.targets[i]`),
    /// compiles its expressions and loads its decoder.
    pub fn new(route: &RouteConfig, tables: &[TableSchema]) -> Result<RouteMapper, SchemaError> {
        let mut targets = route
            .targets
            .iter()
            .zip(tables)
            .enumerate()
            .map(|(i, (target, table))| TargetMapper::new(route, i, target, table))
            .collect::<Result<Vec<_>, _>>()?;
        if route.table_from.is_some() {
            let mut names: Vec<&str> = targets.iter().map(|t| t.table.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            if names.len() != targets.len() {
                return Err(SchemaError::Targets {
                    route: route.name.clone(),
                    reason: "`table_from` needs targets with distinct table names".into(),
                });
            }
        }
        let filter = route
            .filter
            .as_deref()
            .map(|s| compile(&route.name, "filter".into(), s))
            .transpose()?;
        let delete_when = route
            .delete_when
            .as_deref()
            .map(|s| compile(&route.name, "delete_when".into(), s))
            .transpose()?;
        let decoder = Decoder::load(&route.name, &route.format)?;
        let projection = projection_for(route, &decoder, &targets);
        if let Some(projection) = &projection {
            for column in targets.iter_mut().flat_map(|t| t.columns.iter_mut()) {
                if let ValueSource::Field(FieldRef::Path(parts)) = &column.source {
                    column.slots = projection.slots(parts);
                }
            }
        }
        Ok(RouteMapper {
            projection,
            decoder,
            targets,
            table_from: route.table_from.clone(),
            filter,
            delete_when,
            delete_on_tombstone: route.delete_on_tombstone,
            ttl: route.ttl.clone(),
            timestamp: route.timestamp.as_ref().map(|t| (t.field.clone(), t.unit)),
        })
    }

    /// The route's target tables.
    pub fn targets(&self) -> &[TargetMapper] {
        &self.targets
    }

    /// Whether a target's primary key can be read without the payload, so deletes from
    /// tombstones are possible.
    pub fn deletes_without_payload(&self, target: usize) -> bool {
        let target = &self.targets[target];
        target
            .primary_key
            .iter()
            .all(|&i| !target.columns[i].source.reads_payload())
    }

    /// The target's upsert: `INSERT ... USING [TTL ? AND] TIMESTAMP ?`; values are the columns,
    /// then the TTL when the route has one, then the write timestamp.
    pub fn upsert_statement(&self, target: usize) -> String {
        let target = &self.targets[target];
        let mut statement = insert_statement(&target.keyspace, &target.table, target.column_names());
        if self.ttl.is_some() {
            statement = statement.replace(" USING TIMESTAMP ?", " USING TTL ? AND TIMESTAMP ?");
        }
        statement
    }

    /// The target's delete: `DELETE FROM ... USING TIMESTAMP ? WHERE <primary key>`; values are
    /// the write timestamp, then the primary key columns in table order.
    pub fn delete_statement(&self, target: usize) -> String {
        let target = &self.targets[target];
        let keys = target.primary_key.iter().map(|&i| target.columns[i].name.as_str());
        delete_statement(&target.keyspace, &target.table, keys)
    }

    /// Maps one message. `timestamp_us` is the write time derived from the source (time and
    /// position), used unless the route reads it from a field. An empty result means the message
    /// was filtered out (or went to no target) and is done.
    pub fn map(&self, envelope: &Envelope<'_>, timestamp_us: i64) -> Result<Vec<MappedRow>, MappingError> {
        let mut rows = Vec::new();
        self.map_with(envelope, timestamp_us, &mut CqlOutput::default(), &mut rows)?;
        Ok(rows)
    }

    /// [`RouteMapper::map`] with each row's values serialized as CQL cells at the end of
    /// `builder` (the bytes the driver would make of `map`'s values), no `CqlValue` in between:
    /// the rows are pushed onto `rows`, each with where its cells are, to be sealed with the
    /// rest of the batch. Returns how many rows the message became; on error `rows` is as it
    /// was (cells of the message's finished rows stay in `builder`, unused).
    pub fn map_cells(
        &self,
        envelope: &Envelope<'_>,
        timestamp_us: i64,
        builder: &mut RowBuilder,
        rows: &mut Vec<MappedRow<RowSpan>>,
    ) -> Result<usize, MappingError> {
        let before = rows.len();
        let mut out = CellOutput::new(builder);
        match self.map_with(envelope, timestamp_us, &mut out, rows) {
            Ok(()) => Ok(rows.len() - before),
            Err(error) => {
                rows.truncate(before);
                Err(error)
            }
        }
    }

    /// [`RouteMapper::map_cells`] that also returns the rows as CQL values ([`RouteMapper::map`]'s),
    /// mapped once: for a route a stream job taps. On error `rows` is as it was.
    pub fn map_cells_and_values(
        &self,
        envelope: &Envelope<'_>,
        timestamp_us: i64,
        builder: &mut RowBuilder,
        rows: &mut Vec<MappedRow<RowSpan>>,
    ) -> Result<Vec<MappedRow>, MappingError> {
        let mut out = BothOutput {
            values: CqlOutput::default(),
            cells: CellOutput::new(builder),
        };
        let mut both = Vec::new();
        self.map_with(envelope, timestamp_us, &mut out, &mut both)?;
        Ok(both
            .into_iter()
            .map(|row| {
                let (values, span) = row.values;
                rows.push(MappedRow {
                    target: row.target,
                    delete: row.delete,
                    values: span,
                });
                MappedRow {
                    target: row.target,
                    delete: row.delete,
                    values,
                }
            })
            .collect())
    }

    /// Maps one message into `out`, pushing its rows onto `rows` (see [`RouteMapper::map`]).
    fn map_with<O: RowOutput>(
        &self,
        envelope: &Envelope<'_>,
        timestamp_us: i64,
        out: &mut O,
        rows: &mut Vec<MappedRow<O::Row>>,
    ) -> Result<(), MappingError> {
        let tombstone = envelope.payload.is_none();
        let decoded = match envelope.payload {
            Some(payload) => self.decode(payload)?,
            None if self.delete_on_tombstone => Decoded::Full(Value::Null),
            None => return Err(MappingError::EmptyPayload),
        };
        let message = Message {
            envelope,
            document: &decoded,
            key_document: std::cell::OnceCell::new(),
            bound: std::cell::OnceCell::new(),
        };
        if !tombstone {
            if let Some(filter) = &self.filter {
                if !message.condition("filter", filter)? {
                    return Ok(());
                }
            }
        }
        let delete = tombstone
            || match &self.delete_when {
                Some(expr) => message.condition("delete_when", expr)?,
                None => false,
            };
        let timestamp_us = match &self.timestamp {
            Some((field, unit)) => self.timestamp_from(&message, field, *unit)?.unwrap_or(timestamp_us),
            None => timestamp_us,
        };
        let chosen = self.chosen_targets(&message, tombstone)?;
        rows.reserve(chosen.len());
        for index in chosen {
            let target = &self.targets[index];
            if delete {
                out.start(target.primary_key.len() + 1);
                out.bigint(timestamp_us);
                for &i in &target.primary_key {
                    message.bind(&target.columns[i], true, out)?;
                }
            } else {
                out.start(target.columns.len() + 2);
                for (i, column) in target.columns.iter().enumerate() {
                    message.bind(column, target.primary_key.contains(&i), out)?;
                }
                if self.ttl.is_some() {
                    match self.ttl_seconds(&message)? {
                        Some(seconds) => out.int(seconds),
                        None => out.unset(),
                    }
                }
                out.bigint(timestamp_us);
            }
            let values = out.finish().ok_or_else(|| MappingError::BadAttribute {
                key: "columns",
                field: target.qualified(),
                reason: TOO_MANY_VALUES.into(),
            })?;
            rows.push(MappedRow {
                target: index,
                delete,
                values,
            });
        }
        Ok(())
    }

    /// Decodes a payload: projected when the route allows and the payload is one JSON object,
    /// else in full (which also reports why a payload is refused).
    fn decode<'a>(&'a self, payload: &'a [u8]) -> Result<Decoded<'a>, MappingError> {
        if let Some(projection) = &self.projection {
            if let Some(members) = projection.decode(payload) {
                return Ok(Decoded::Projected(projection, members));
            }
        }
        self.decoder.decode(payload).map(Decoded::Full)
    }

    /// Targets this message goes to: the one `table_from` names, else every target whose `when`
    /// holds. A tombstone has no payload to test: it deletes from every target whose primary key
    /// comes from the key, headers or metadata (or the one `table_from` names when that does),
    /// and fails when there is none.
    fn chosen_targets(&self, message: &Message<'_, '_>, tombstone: bool) -> Result<Vec<usize>, MappingError> {
        if let Some(field) = &self.table_from {
            let found = message.field(field, "table_from")?;
            let value = match &found {
                Found::Bytes(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
                found => found.json().map(|json| match json {
                    Json::String(s) => s.to_string(),
                    other => other.to_string(),
                }),
            };
            match value {
                None if tombstone => {}
                found => {
                    let value = found.unwrap_or_default();
                    let index = self
                        .targets
                        .iter()
                        .position(|t| t.table == value || t.qualified() == value);
                    return match index {
                        Some(index) => Ok(vec![index]),
                        None => Err(MappingError::UnknownTable {
                            field: field.to_string(),
                            value,
                            tables: self
                                .targets
                                .iter()
                                .map(TargetMapper::qualified)
                                .collect::<Vec<_>>()
                                .join(", "),
                        }),
                    };
                }
            }
        }
        let mut chosen = Vec::with_capacity(self.targets.len());
        for (index, target) in self.targets.iter().enumerate() {
            let wanted = match (&target.when, tombstone) {
                (_, true) => self.deletes_without_payload(index),
                (Some((key, expr)), false) => message.condition(key, expr)?,
                (None, false) => true,
            };
            if wanted {
                chosen.push(index);
            }
        }
        if tombstone && chosen.is_empty() {
            // No target can be keyed without the payload; name the first key column that needs it.
            let target = &self.targets[0];
            let column = target
                .primary_key
                .iter()
                .map(|&i| &target.columns[i])
                .find(|c| c.source.reads_payload())
                .map_or_else(String::new, |c| c.name.clone());
            let field = target
                .columns
                .iter()
                .find(|c| c.name == column)
                .map_or_else(String::new, |c| c.source.label());
            return Err(MappingError::MissingPrimaryKey { column, field });
        }
        Ok(chosen)
    }

    fn timestamp_from(
        &self,
        message: &Message<'_, '_>,
        field: &FieldRef,
        unit: TimeUnit,
    ) -> Result<Option<i64>, MappingError> {
        let bad = |reason: String| MappingError::BadAttribute {
            key: "timestamp",
            field: field.to_string(),
            reason,
        };
        let found = message.field(field, "timestamp")?;
        let bytes_text;
        let value = match &found {
            Found::Missing => return Ok(None),
            Found::Bytes(bytes) => {
                bytes_text = String::from_utf8_lossy(bytes);
                Json::String(&bytes_text)
            }
            found => found.json().unwrap_or(Json::Null),
        };
        let micros = match value {
            Json::Null => return Ok(None),
            Json::Number(n) => {
                let n = value.as_i64().ok_or_else(|| bad(format!("`{n}` is not an integer")))?;
                let scale = match unit {
                    TimeUnit::Seconds => 1_000_000,
                    TimeUnit::Millis => 1_000,
                    TimeUnit::Micros => 1,
                };
                n.checked_mul(scale)
                    .ok_or_else(|| bad(format!("`{n}` is out of range")))?
            }
            Json::String(text) => chrono::DateTime::parse_from_rfc3339(text)
                .map_err(|e| bad(format!("`{text}` is not RFC 3339 time: {e}")))?
                .timestamp_micros(),
            other => {
                return Err(bad(format!(
                    "expected a number or RFC 3339 text, got {}",
                    coerce::preview(other)
                )))
            }
        };
        if micros < 0 {
            return Err(bad(format!("`{value}` is before 1970")));
        }
        Ok(Some(micros))
    }

    /// The row's TTL in seconds; `None` leaves it unset.
    fn ttl_seconds(&self, message: &Message<'_, '_>) -> Result<Option<i32>, MappingError> {
        let field = match &self.ttl {
            None => return Ok(None),
            Some(TtlConfig::Seconds(seconds)) => return Ok(Some(*seconds)),
            Some(TtlConfig::Field(field)) => field,
        };
        let bad = |reason: String| MappingError::BadAttribute {
            key: "ttl",
            field: field.to_string(),
            reason,
        };
        let found = message.field(field, "ttl")?;
        let seconds = match &found {
            Found::Missing => return Ok(None),
            Found::Bytes(bytes) => std::str::from_utf8(bytes).ok().and_then(|s| s.trim().parse().ok()),
            found => match found.json() {
                None | Some(Json::Null) => return Ok(None),
                Some(number @ Json::Number(_)) => number.as_i64(),
                Some(Json::String(s)) => s.trim().parse::<i64>().ok(),
                Some(_) => None,
            },
        };
        match seconds {
            Some(seconds @ 0..=TTL_MAX_SECONDS) => Ok(Some(seconds as i32)),
            _ => Err(bad(format!("expected whole seconds between 0 and {TTL_MAX_SECONDS}"))),
        }
    }
}

/// The projection of a JSON route none of whose values or conditions is an expression: the
/// payload paths it reads (columns, TTL, timestamp, `table_from`).
fn projection_for(route: &RouteConfig, decoder: &Decoder, targets: &[TargetMapper]) -> Option<Projection> {
    if !matches!(decoder, Decoder::Json)
        || route.filter.is_some()
        || route.delete_when.is_some()
        || targets.iter().any(|t| t.when.is_some())
    {
        return None;
    }
    let mut fields: Vec<&FieldRef> = Vec::new();
    for target in targets {
        for column in &target.columns {
            match &column.source {
                ValueSource::Field(field) => fields.push(field),
                ValueSource::Expr(_) => return None,
            }
        }
    }
    if let Some(TtlConfig::Field(field)) = &route.ttl {
        fields.push(field);
    }
    fields.extend(route.timestamp.as_ref().map(|t| &t.field));
    fields.extend(route.table_from.as_ref());
    let mut paths = Vec::new();
    for field in fields {
        match field {
            FieldRef::Path(parts) if !parts.is_empty() => paths.push(parts.as_slice()),
            FieldRef::Path(_) | FieldRef::Expr(_) => return None,
            _ => {}
        }
    }
    Some(Projection::new(paths))
}

/// Follows a path of object keys; `None` when any step is absent or not an object.
fn lookup<'a>(document: &'a Value, parts: &[String]) -> Option<&'a Value> {
    parts
        .iter()
        .try_fold(document, |node, part| node.as_object()?.get(part))
}

/// Deterministic write timestamp in microseconds from a source position: the source time in
/// milliseconds, plus the position within that millisecond (`offset mod 1000`). A replay of the
/// same message writes the same timestamp, and up to 1000 messages of one partition within one
/// millisecond apply in source order. A message without a time uses 0 ms.
pub fn write_timestamp_us(source_time_ms: Option<i64>, offset: i64) -> i64 {
    let millis = source_time_ms.unwrap_or(0).clamp(0, i64::MAX / 1000 - 1);
    millis * 1000 + offset.rem_euclid(1000)
}

/// The next write timestamp of a partition whose previous message was written at
/// `previous_us`: the source time in microseconds, but always after the previous message. So
/// any number of messages within one millisecond apply in source order. Deterministic on replay
/// when `previous_us` is restored with the committed position (Kafka: commit metadata).
pub fn next_write_timestamp_us(source_time_ms: Option<i64>, previous_us: i64) -> i64 {
    let millis = source_time_ms.unwrap_or(0).clamp(0, i64::MAX / 1000 - 1);
    (millis * 1000).max(previous_us.saturating_add(1))
}

#[cfg(test)]
mod tests;
