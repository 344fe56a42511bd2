//! Payload decoding: every format becomes a JSON document, so one field → column mapping,
//! one set of coercion rules and one expression language serve them all.
//!
//! Protobuf: the message type is loaded at start-up from a `FileDescriptorSet` or compiled from
//! `.proto` files (protox, no protoc needed at run time) and decoded with prost-reflect. Fields
//! keep their `.proto` names; a field with presence (`optional`, messages, oneof members) that
//! is not set is absent (its column stays unset), other scalars carry their value, default or
//! not; enums become their value name; `bytes` become base64 text (read back by `blob` columns);
//! `google.protobuf.Timestamp` becomes RFC 3339 text.
//!
//! FlatBuffers: the binary schema (`flatc --binary --schema`, a `.bfbs`) is loaded at start-up;
//! every message is verified against it before it is read (flatbuffers-reflection), then its
//! root table becomes an object by field name: scalars (defaults included, as FlatBuffers
//! stores them), enums as their names, strings, nested tables and structs as objects, vectors
//! of scalars as arrays. Unions and vectors of strings or tables are not mapped (the reflection
//! crate's verified reader does not reach them).

use base64::Engine as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, MessageDescriptor, ReflectMessage, Value as PbValue};
use serde_json::{Map, Number, Value};

use super::error::{MappingError, SchemaError};
use crate::config::{Format, ProtobufConfig};
use flatbuffers_reflection::reflection::{BaseType, Schema};
use flatbuffers_reflection::SafeBuffer;

/// Decodes the payloads of one route.
#[derive(Debug, Clone)]
pub enum Decoder {
    /// One JSON object per message.
    Json,
    /// One Protobuf message of this type per message.
    Protobuf(MessageDescriptor),
    /// One FlatBuffers buffer per message; the binary schema's bytes (verified at load).
    FlatBuffers(std::sync::Arc<Vec<u8>>),
    /// The payload is only reachable as `$payload`.
    Raw,
}

impl Decoder {
    /// Builds the decoder of a route's format; loads Protobuf descriptors (file IO).
    pub fn load(route: &str, format: &Format) -> Result<Decoder, SchemaError> {
        match format {
            Format::Json => Ok(Decoder::Json),
            Format::Text | Format::Bytes => Ok(Decoder::Raw),
            Format::FlatBuffers(path) => load_flatbuffers_schema(path)
                .map(|bytes| Decoder::FlatBuffers(std::sync::Arc::new(bytes)))
                .map_err(|reason| SchemaError::Format {
                    route: route.to_string(),
                    reason,
                }),
            Format::Protobuf(config) => {
                load_protobuf(config)
                    .map(Decoder::Protobuf)
                    .map_err(|reason| SchemaError::Format {
                        route: route.to_string(),
                        reason,
                    })
            }
        }
    }

    /// Decodes one payload into the document fields are read from.
    pub fn decode(&self, payload: &[u8]) -> Result<Value, MappingError> {
        match self {
            Decoder::Json => {
                let document: Value =
                    serde_json::from_slice(payload).map_err(|e| MappingError::NotJson(e.to_string()))?;
                if !document.is_object() {
                    return Err(MappingError::NotObject);
                }
                Ok(document)
            }
            Decoder::Protobuf(descriptor) => DynamicMessage::decode(descriptor.clone(), payload)
                .map(|message| message_to_json(&message))
                .map_err(|e| MappingError::NotProtobuf(format!("{}: {e}", descriptor.full_name()))),
            Decoder::FlatBuffers(schema) => flatbuffer_to_json(schema, payload).map_err(MappingError::NotFlatBuffer),
            Decoder::Raw => Ok(Value::Null),
        }
    }
}

/// Loads the message type a `[route.protobuf]` or `[job.protobuf]` table names.
pub fn load_protobuf(config: &ProtobufConfig) -> Result<MessageDescriptor, String> {
    let pool = if let Some(path) = &config.descriptor_set {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read `protobuf.descriptor_set` `{}`: {e}", path.display()))?;
        DescriptorPool::decode(bytes.as_slice()).map_err(|e| {
            format!(
                "`protobuf.descriptor_set` `{}` is not a FileDescriptorSet: {e}",
                path.display()
            )
        })?
    } else {
        let includes: Vec<std::path::PathBuf> = if config.includes.is_empty() {
            let mut dirs: Vec<std::path::PathBuf> = config
                .files
                .iter()
                .map(|f| f.parent().map_or_else(|| ".".into(), std::path::Path::to_path_buf))
                .collect();
            dirs.dedup();
            dirs
        } else {
            config.includes.clone()
        };
        let set =
            protox::compile(&config.files, &includes).map_err(|e| format!("cannot compile `protobuf.files`: {e}"))?;
        DescriptorPool::from_file_descriptor_set(set).map_err(|e| format!("`protobuf.files`: {e}"))?
    };
    pool.get_message_by_name(&config.message).ok_or_else(|| {
        let mut known: Vec<String> = pool.all_messages().map(|m| m.full_name().to_string()).collect();
        known.sort();
        known.truncate(20);
        format!(
            "`protobuf.message` `{}` is not defined; messages: {}",
            config.message,
            known.join(", ")
        )
    })
}

fn load_flatbuffers_schema(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read `flatbuffers.schema` `{}`: {e}", path.display()))?;
    let schema = flatbuffers_reflection::reflection::root_as_schema(&bytes).map_err(|e| {
        format!(
            "`flatbuffers.schema` `{}` is not a binary schema (flatc --binary --schema): {e}",
            path.display()
        )
    })?;
    if schema.root_table().is_none() {
        return Err(format!(
            "`flatbuffers.schema` `{}` declares no `root_type`",
            path.display()
        ));
    }
    Ok(bytes)
}

/// Verifies `payload` against the binary schema and reads its root table. Tables and structs
/// are walked with explicit stacks (the crate's safe table types are not nameable, so they
/// cannot be passed to a recursive function); each nested object is inserted at its path.
fn flatbuffer_to_json(schema_bytes: &[u8], payload: &[u8]) -> Result<Value, String> {
    let schema = flatbuffers_reflection::reflection::root_as_schema(schema_bytes).map_err(|e| e.to_string())?;
    let root = schema.root_table().ok_or("the schema has no root type")?;
    let buffer = SafeBuffer::new(payload, &schema).map_err(|e| format!("{}: {e}", root.name()))?;
    let error = |e: flatbuffers_reflection::FlatbufferError| format!("{}: {e}", root.name());
    let object_at = |index: i32| schema.objects().iter().nth(usize::try_from(index).ok()?);
    let number = |f: f64| Number::from_f64(f).map_or(Value::Null, Value::Number);
    let mut document = Value::Object(Map::new());
    let mut tables = vec![(root, buffer.get_root(), Vec::<String>::new())];
    let mut structs = Vec::new();
    while let Some((object, table, path)) = tables.pop() {
        let mut fields = Map::new();
        for field in object.fields() {
            if field.deprecated() {
                continue;
            }
            let name = field.name();
            let typ = field.type_();
            let child = || {
                let mut child = path.clone();
                child.push(name.to_string());
                child
            };
            macro_rules! numbers {
                ($t:ty) => {
                    table.get_field_vector::<$t>(name).map_err(error)?.map(|v| {
                        v.iter()
                            .map(|n| enum_name(&schema, typ.index(), n as i64).unwrap_or(Value::from(n)))
                            .collect::<Vec<_>>()
                    })
                };
            }
            let value = match typ.base_type() {
                BaseType::Bool => Value::Bool(table.get_any_field_integer(name).map_err(error)? != 0),
                BaseType::Float | BaseType::Double => number(table.get_any_field_float(name).map_err(error)?),
                BaseType::String => match table.get_field_string(name).map_err(error)? {
                    Some(text) => Value::String(text.to_string()),
                    None => continue,
                },
                BaseType::Obj => {
                    let Some(nested) = object_at(typ.index()) else { continue };
                    if nested.is_struct() {
                        if let Some(st) = table.get_field_struct(name).map_err(error)? {
                            structs.push((nested, st, child()));
                        }
                    } else if let Some(inner) = table.get_field_table(name).map_err(error)? {
                        tables.push((nested, inner, child()));
                    }
                    continue;
                }
                BaseType::Vector => {
                    let items = match typ.element() {
                        BaseType::Bool => table
                            .get_field_vector::<bool>(name)
                            .map_err(error)?
                            .map(|v| v.iter().map(Value::Bool).collect::<Vec<_>>()),
                        BaseType::Byte => numbers!(i8),
                        BaseType::UByte => numbers!(u8),
                        BaseType::Short => numbers!(i16),
                        BaseType::UShort => numbers!(u16),
                        BaseType::Int => numbers!(i32),
                        BaseType::UInt => numbers!(u32),
                        BaseType::Long => numbers!(i64),
                        BaseType::ULong => table
                            .get_field_vector::<u64>(name)
                            .map_err(error)?
                            .map(|v| v.iter().map(Value::from).collect::<Vec<_>>()),
                        BaseType::Float => table
                            .get_field_vector::<f32>(name)
                            .map_err(error)?
                            .map(|v| v.iter().map(|n| number(f64::from(n))).collect::<Vec<_>>()),
                        BaseType::Double => table
                            .get_field_vector::<f64>(name)
                            .map_err(error)?
                            .map(|v| v.iter().map(number).collect::<Vec<_>>()),
                        _ => None,
                    };
                    match items {
                        Some(items) => Value::Array(items),
                        None => continue,
                    }
                }
                BaseType::Byte
                | BaseType::UByte
                | BaseType::Short
                | BaseType::UShort
                | BaseType::Int
                | BaseType::UInt
                | BaseType::Long
                | BaseType::ULong => {
                    let n = table.get_any_field_integer(name).map_err(error)?;
                    enum_name(&schema, typ.index(), n).unwrap_or(Value::from(n))
                }
                _ => continue,
            };
            fields.insert(name.to_string(), value);
        }
        insert_at(&mut document, &path, Value::Object(fields));
    }
    while let Some((object, st, path)) = structs.pop() {
        let mut fields = Map::new();
        for field in object.fields() {
            let name = field.name();
            let typ = field.type_();
            let value = match typ.base_type() {
                BaseType::Bool => Value::Bool(st.get_any_field_integer(name).map_err(error)? != 0),
                BaseType::Float | BaseType::Double => number(st.get_any_field_float(name).map_err(error)?),
                BaseType::Obj => {
                    if let Some(nested) = object_at(typ.index()) {
                        let mut child = path.clone();
                        child.push(name.to_string());
                        structs.push((nested, st.get_field_struct(name).map_err(error)?, child));
                    }
                    continue;
                }
                BaseType::Array | BaseType::Vector | BaseType::String | BaseType::Union | BaseType::UType => continue,
                _ => {
                    let n = st.get_any_field_integer(name).map_err(error)?;
                    enum_name(&schema, typ.index(), n).unwrap_or(Value::from(n))
                }
            };
            fields.insert(name.to_string(), value);
        }
        insert_at(&mut document, &path, Value::Object(fields));
    }
    Ok(document)
}

/// The name of `value` in enum `index` of the schema, if the field is an enum.
fn enum_name(schema: &Schema<'_>, index: i32, value: i64) -> Option<Value> {
    let enumeration = schema.enums().iter().nth(usize::try_from(index).ok()?)?;
    let name = enumeration.values().iter().find(|v| v.value() == value)?.name();
    Some(Value::String(name.to_string()))
}

/// Puts `value` at `path` in `document` (parents exist: they are inserted first).
fn insert_at(document: &mut Value, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        *document = value;
        return;
    };
    let mut node = document;
    for part in parents {
        let Some(next) = node.as_object_mut().and_then(|o| o.get_mut(part)) else {
            return;
        };
        node = next;
    }
    if let Some(object) = node.as_object_mut() {
        object.insert(last.clone(), value);
    }
}

/// A decoded message as a JSON object (rules in the module docs).
pub fn message_to_json(message: &DynamicMessage) -> Value {
    let descriptor = message.descriptor();
    if descriptor.full_name() == "google.protobuf.Timestamp" {
        if let Some(text) = timestamp_text(message) {
            return Value::String(text);
        }
    }
    let mut object = Map::new();
    for field in descriptor.fields() {
        if field.supports_presence() && !message.has_field(&field) {
            continue;
        }
        let value = message.get_field(&field);
        object.insert(field.name().to_string(), value_to_json(&value, &field.kind()));
    }
    Value::Object(object)
}

fn timestamp_text(message: &DynamicMessage) -> Option<String> {
    let seconds = message.get_field_by_name("seconds")?.as_i64()?;
    let nanos = message.get_field_by_name("nanos")?.as_i32()?;
    let time = chrono::DateTime::from_timestamp(seconds, u32::try_from(nanos).ok()?)?;
    Some(time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

fn value_to_json(value: &PbValue, kind: &prost_reflect::Kind) -> Value {
    match value {
        PbValue::Bool(b) => Value::Bool(*b),
        PbValue::I32(n) => Value::from(*n),
        PbValue::I64(n) => Value::from(*n),
        PbValue::U32(n) => Value::from(*n),
        PbValue::U64(n) => Value::from(*n),
        PbValue::F32(n) => Number::from_f64(f64::from(*n)).map_or(Value::Null, Value::Number),
        PbValue::F64(n) => Number::from_f64(*n).map_or(Value::Null, Value::Number),
        PbValue::String(s) => Value::String(s.clone()),
        PbValue::Bytes(b) => Value::String(base64::engine::general_purpose::STANDARD.encode(b)),
        PbValue::EnumNumber(number) => match kind.as_enum().and_then(|e| e.get_value(*number)) {
            Some(value) => Value::String(value.name().to_string()),
            None => Value::from(*number),
        },
        PbValue::Message(message) => message_to_json(message),
        PbValue::List(items) => Value::Array(items.iter().map(|item| value_to_json(item, kind)).collect()),
        PbValue::Map(entries) => {
            let value_kind = kind
                .as_message()
                .map(|entry| entry.map_entry_value_field().kind())
                .unwrap_or_else(|| kind.clone());
            let object = entries
                .iter()
                .map(|(key, value)| (map_key_text(key), value_to_json(value, &value_kind)))
                .collect();
            Value::Object(object)
        }
    }
}

fn map_key_text(key: &MapKey) -> String {
    match key {
        MapKey::Bool(b) => b.to_string(),
        MapKey::I32(n) => n.to_string(),
        MapKey::I64(n) => n.to_string(),
        MapKey::U32(n) => n.to_string(),
        MapKey::U64(n) => n.to_string(),
        MapKey::String(s) => s.clone(),
    }
}
