//! Bound values as the write engine takes them: anything the driver can serialize as a row
//! (`SerializeRow`) that can also hand out a partition-key value serialized, for the token.
//! Two kinds exist: [`RowValues`] (CQL values, as mapping and the query API build them) and
//! [`SerializedRow`] (cells serialized once, as the ingest API binds protobuf values: no
//! `CqlValue` per cell, and the driver copies the whole row into the request frame at once).
//!
//! Threads: pure data; built on the core that binds the row, read on the core that writes it.

use std::sync::Arc;

use scylla::cluster::metadata::{ColumnType, NativeType};
use scylla::serialize::row::{RowSerializationContext, SerializeRow};
use scylla::serialize::value::SerializeValue;
use scylla::serialize::writers::{CellWriter, RowWriter};
use scylla::serialize::SerializationError;
use scylla::value::MaybeUnset;

use super::schema::RowValues;

/// Bound values the write engine can write and place.
pub trait BoundValues: SerializeRow {
    /// The serialized value (no length prefix) of bound value `index` for a column of `typ`,
    /// serialized into `scratch` when it is not serialized already. `None` when the value is
    /// unset, null or does not fit `typ`.
    fn key_cell<'a>(&'a self, index: usize, typ: &ColumnType<'_>, scratch: &'a mut Vec<u8>) -> Option<&'a [u8]>;
}

impl BoundValues for RowValues {
    fn key_cell<'a>(&'a self, index: usize, typ: &ColumnType<'_>, scratch: &'a mut Vec<u8>) -> Option<&'a [u8]> {
        let MaybeUnset::Set(Some(value)) = self.get(index)? else {
            return None;
        };
        scratch.clear();
        value.serialize(typ, CellWriter::new(scratch)).ok()?;
        // A serialized cell is a 4-byte length, then the value.
        scratch.get(4..)
    }
}

/// A row's values serialized once as CQL cells (each a 4-byte length, then the bytes; -1 for
/// null, -2 for unset), in the order of its statement's markers. The rows of one batch share
/// one buffer ([`RowBuilder::seal`]): a row costs no allocation of its own.
#[derive(Debug, Clone)]
pub struct SerializedRow {
    /// The buffer of the batch the row was bound in.
    buffer: Arc<[u8]>,
    /// Where the row's cells are in `buffer`: whole cells only ([`RowBuilder::finish`] checks).
    span: RowSpan,
}

/// Where a finished row's cells are in its [`RowBuilder`]'s buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSpan {
    /// First byte.
    start: usize,
    /// Past the last byte.
    end: usize,
    /// How many cells.
    count: u16,
}

impl PartialEq for SerializedRow {
    /// The same cells, wherever they are kept.
    fn eq(&self, other: &SerializedRow) -> bool {
        self.span.count == other.span.count && self.cells() == other.cells()
    }
}

impl Eq for SerializedRow {}

/// One serialized cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell<'a> {
    /// A value's bytes.
    Value(&'a [u8]),
    /// A CQL null.
    Null,
    /// Unset: the column keeps what it holds.
    Unset,
}

/// The first cell of `cells` and what follows it; `None` at the end or on a torn cell.
fn next_cell(cells: &[u8]) -> Option<(Cell<'_>, &[u8])> {
    let (length, rest) = cells.split_first_chunk::<4>()?;
    match i32::from_be_bytes(*length) {
        -1 => Some((Cell::Null, rest)),
        -2 => Some((Cell::Unset, rest)),
        length => {
            let length = usize::try_from(length).ok()?;
            (rest.len() >= length).then(|| (Cell::Value(&rest[..length]), &rest[length..]))
        }
    }
}

/// The cells of `cells` in order, stopping at a torn one.
fn cells_of(mut cells: &[u8]) -> impl Iterator<Item = Cell<'_>> {
    std::iter::from_fn(move || {
        let (cell, rest) = next_cell(cells)?;
        cells = rest;
        Some(cell)
    })
}

/// A serialized row bound to a statement with another number of markers: a bug in the caller,
/// refused by the driver before anything is sent.
#[derive(Debug, thiserror::Error)]
#[error("the row has {cells} serialized values; the statement has {markers} markers")]
struct MarkerCountMismatch {
    cells: usize,
    markers: usize,
}

impl SerializedRow {
    /// How many values the row holds.
    pub fn len(&self) -> usize {
        usize::from(self.span.count)
    }

    /// Whether the row holds no value.
    pub fn is_empty(&self) -> bool {
        self.span.count == 0
    }

    /// The row `span` of the buffer its builder sealed ([`RowBuilder::seal`]). A span from
    /// another buffer reads as torn cells, which serialization refuses: the row is refused, never
    /// sent wrong.
    pub fn new(buffer: &Arc<[u8]>, span: RowSpan) -> SerializedRow {
        SerializedRow {
            buffer: Arc::clone(buffer),
            span,
        }
    }

    /// The cells, one after another (none when the span is not in the buffer).
    fn cells(&self) -> &[u8] {
        self.buffer.get(self.span.start..self.span.end).unwrap_or_default()
    }
}

impl SerializeRow for SerializedRow {
    fn serialize(
        &self,
        ctx: &RowSerializationContext<'_>,
        writer: &mut RowWriter<'_>,
    ) -> Result<(), SerializationError> {
        let markers = ctx.columns().len();
        if markers != self.len() {
            return Err(SerializationError::new(MarkerCountMismatch {
                cells: self.len(),
                markers,
            }));
        }
        let mut written = 0;
        for cell in cells_of(self.cells()) {
            written += 1;
            let cell_writer = writer.make_cell_writer();
            match cell {
                Cell::Value(bytes) => {
                    // Cannot overflow: the length was read from an `[int]`.
                    cell_writer.set_value(bytes).map_err(SerializationError::new)?;
                }
                Cell::Null => {
                    cell_writer.set_null();
                }
                Cell::Unset => {
                    cell_writer.set_unset();
                }
            }
        }
        if written != markers {
            // Torn cells: refused before anything is sent.
            return Err(SerializationError::new(MarkerCountMismatch {
                cells: written,
                markers,
            }));
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        SerializedRow::is_empty(self)
    }
}

impl BoundValues for SerializedRow {
    fn key_cell<'a>(&'a self, index: usize, _: &ColumnType<'_>, _: &'a mut Vec<u8>) -> Option<&'a [u8]> {
        // Already serialized for its column's type when bound.
        match cells_of(self.cells()).nth(index)? {
            Cell::Value(bytes) => Some(bytes),
            Cell::Null | Cell::Unset => None,
        }
    }
}

/// Builds the [`SerializedRow`]s of a batch cell by cell, one after another in one buffer
/// ([`RowBuilder::seal`] shares it among them).
#[derive(Debug, Default)]
pub struct RowBuilder {
    /// The finished rows' cells, then the cells of the row being built.
    buffer: Vec<u8>,
    /// Where the row being built starts.
    row_start: usize,
    /// Cells written since [`RowBuilder::start`].
    cells: u16,
}

/// More cells in a row than the protocol allows (65,535).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a row holds at most 65535 values")]
pub struct TooManyCells;

impl RowBuilder {
    /// A builder with room for `rows` rows of a few short columns before it grows.
    pub fn for_rows(rows: usize) -> RowBuilder {
        /// Cell bytes a row is given room for (a ~100-byte row and its cells' lengths).
        const ROW_BYTES: usize = 128;
        RowBuilder {
            buffer: Vec::with_capacity(rows.saturating_mul(ROW_BYTES)),
            ..RowBuilder::default()
        }
    }

    /// Starts a new row, dropping whatever an unfinished one left.
    pub fn start(&mut self) {
        self.buffer.truncate(self.row_start);
        self.cells = 0;
    }

    /// The buffer to write the next cell at the end of (exactly one cell: a 4-byte length,
    /// then the bytes), counted as written.
    pub fn cell(&mut self) -> Result<&mut Vec<u8>, TooManyCells> {
        self.cells = self.cells.checked_add(1).ok_or(TooManyCells)?;
        Ok(&mut self.buffer)
    }

    /// Writes a bigint cell (the write timestamp).
    pub fn bigint(&mut self, value: i64) -> Result<(), TooManyCells> {
        let buffer = self.cell()?;
        buffer.extend_from_slice(&8i32.to_be_bytes());
        buffer.extend_from_slice(&value.to_be_bytes());
        Ok(())
    }

    /// Writes an int cell (a TTL).
    pub fn int(&mut self, value: i32) -> Result<(), TooManyCells> {
        let buffer = self.cell()?;
        buffer.extend_from_slice(&4i32.to_be_bytes());
        buffer.extend_from_slice(&value.to_be_bytes());
        Ok(())
    }

    /// Writes a null cell.
    pub fn null(&mut self) -> Result<(), TooManyCells> {
        self.cell()?.extend_from_slice(&(-1i32).to_be_bytes());
        Ok(())
    }

    /// Writes an unset cell (a value the row leaves as it is).
    pub fn unset(&mut self) -> Result<(), TooManyCells> {
        self.cell()?.extend_from_slice(&(-2i32).to_be_bytes());
        Ok(())
    }

    /// Whether cell `index` of the row being built holds a value (not null, not unset).
    pub fn holds_value(&self, index: usize) -> bool {
        let row = self.buffer.get(self.row_start..).unwrap_or_default();
        matches!(cells_of(row).nth(index), Some(Cell::Value(_)))
    }

    /// Ends the row built since [`RowBuilder::start`]: where it is, for [`RowBuilder::seal`].
    /// `None` when a cell written through [`RowBuilder::cell`] was not one whole cell.
    pub fn finish(&mut self) -> Option<RowSpan> {
        let mut rest = self.buffer.get(self.row_start..)?;
        for _ in 0..self.cells {
            rest = next_cell(rest)?.1;
        }
        if !rest.is_empty() {
            return None;
        }
        let span = RowSpan {
            start: self.row_start,
            end: self.buffer.len(),
            count: self.cells,
        };
        self.row_start = span.end;
        Some(span)
    }

    /// The finished rows' buffer, to be shared by their [`SerializedRow`]s; the builder starts
    /// over empty.
    pub fn seal(&mut self) -> Arc<[u8]> {
        let sealed = Arc::from(self.buffer.get(..self.row_start).unwrap_or_default());
        self.buffer.clear();
        self.row_start = 0;
        self.cells = 0;
        sealed
    }

    /// Seals the buffer for the one row `span` (tests and tools; a batch seals once for all
    /// its rows).
    pub fn single(&mut self, span: RowSpan) -> SerializedRow {
        SerializedRow::new(&self.seal(), span)
    }
}

/// Appends a cell holding `bytes`; `None` past the protocol's 2 GiB cell size.
pub fn put(buffer: &mut Vec<u8>, bytes: &[u8]) -> Option<()> {
    buffer.extend_from_slice(&i32::try_from(bytes.len()).ok()?.to_be_bytes());
    buffer.extend_from_slice(bytes);
    Some(())
}

/// Appends an integer cell of the width of `native` (`tinyint` to `bigint`); `None` for any other
/// type or a value out of its range.
pub fn put_integer(buffer: &mut Vec<u8>, native: &NativeType, n: i64) -> Option<()> {
    match native {
        NativeType::TinyInt => put(buffer, &i8::try_from(n).ok()?.to_be_bytes()),
        NativeType::SmallInt => put(buffer, &i16::try_from(n).ok()?.to_be_bytes()),
        NativeType::Int => put(buffer, &i32::try_from(n).ok()?.to_be_bytes()),
        NativeType::BigInt => put(buffer, &n.to_be_bytes()),
        _ => None,
    }
}

/// Appends a collection cell: its length, the element count, then what `elements` writes
/// (which returns how many elements it wrote).
pub fn write_collection(buffer: &mut Vec<u8>, elements: impl FnOnce(&mut Vec<u8>) -> Option<usize>) -> Option<()> {
    // The length and the element count are known once the elements are written.
    let start = buffer.len();
    buffer.extend_from_slice(&[0; 8]);
    let count = i32::try_from(elements(buffer)?).ok()?;
    let length = i32::try_from(buffer.len() - start - 4).ok()?;
    buffer.get_mut(start..start + 4)?.copy_from_slice(&length.to_be_bytes());
    buffer
        .get_mut(start + 4..start + 8)?
        .copy_from_slice(&count.to_be_bytes());
    Some(())
}

#[cfg(test)]
mod tests {
    use scylla::value::CqlValue;

    use super::*;

    #[test]
    fn built_rows_hold_their_cells_and_key_values() {
        let mut builder = RowBuilder::default();
        builder.start();
        let cell = builder.cell().expect("room");
        CqlValue::Text("k".into())
            .serialize(&ColumnType::Native(NativeType::Text), CellWriter::new(cell))
            .expect("text");
        builder.unset().expect("room");
        builder.bigint(7).expect("room");
        assert!(builder.holds_value(0) && !builder.holds_value(1) && builder.holds_value(2));
        let span = builder.finish().expect("whole cells");
        // A second row in the same buffer, then both shared.
        builder.start();
        builder.bigint(8).expect("room");
        let second = builder.finish().expect("whole cells");
        let sealed = builder.seal();
        let row = SerializedRow::new(&sealed, span);
        let other = SerializedRow::new(&sealed, second);
        assert_eq!((row.len(), other.len()), (3, 1));
        assert_ne!(row, other);
        let mut scratch = Vec::new();
        let text = ColumnType::Native(NativeType::Text);
        assert_eq!(row.key_cell(0, &text, &mut scratch), Some(&b"k"[..]));
        assert_eq!(row.key_cell(1, &text, &mut scratch), None);
        assert_eq!(row.key_cell(2, &text, &mut scratch), Some(&7i64.to_be_bytes()[..]));
        // The same key from CQL values.
        let values: RowValues = vec![MaybeUnset::Set(Some(CqlValue::Text("k".into())))];
        assert_eq!(values.key_cell(0, &text, &mut scratch), Some(&b"k"[..]));

        // A torn cell is refused rather than sent, and the next row starts where it began.
        builder.start();
        builder.cell().expect("room").extend_from_slice(&5i32.to_be_bytes());
        assert_eq!(builder.finish(), None);
        builder.start();
        builder.bigint(8).expect("room");
        let span = builder.finish().expect("whole cells");
        assert_eq!(builder.single(span), other);
    }

    /// A row whose span is not in its buffer (cells lost to a bug) is refused at serialization,
    /// before anything is sent; the same span in its own buffer serializes.
    #[test]
    fn a_span_of_another_buffer_is_refused_not_sent() {
        use scylla::frame::response::result::{ColumnSpec, TableSpec};
        let mut builder = RowBuilder::default();
        builder.start();
        builder.bigint(1).expect("room");
        builder.bigint(2).expect("room");
        let span = builder.finish().expect("whole cells");
        let bigint = ColumnType::Native(NativeType::BigInt);
        let specs = [
            ColumnSpec::borrowed("a", bigint.clone(), TableSpec::borrowed("ks", "t")),
            ColumnSpec::borrowed("b", bigint, TableSpec::borrowed("ks", "t")),
        ];
        let context = RowSerializationContext::from_specs(&specs);
        let stray = SerializedRow::new(&Arc::from(&[0u8; 3][..]), span);
        let mut sent = Vec::new();
        assert!(stray.serialize(&context, &mut RowWriter::new(&mut sent)).is_err());
        let row = builder.single(span);
        let mut sent = Vec::new();
        assert!(row.serialize(&context, &mut RowWriter::new(&mut sent)).is_ok());
        assert_eq!(sent.len(), 2 * (4 + 8));
    }
}
