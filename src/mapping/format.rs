//! Payload decoding: every format becomes a JSON document, so one field → column mapping,
//! one set of coercion rules and one expression language serve them all.
//!
//! Protobuf: the message type is loaded at start-up from a `FileDescriptorSet` or compiled from
//! `.proto` files (protox, no protoc needed at run time) and decoded with prost-reflect. Fields
//! keep their `.proto` names; a field with presence (`optional`, messages, oneof members) that
//! is not set is absent (its column stays unset), other scalars carry their value, default or
//! not; enums become their value name; `bytes` become base64 text (read back by `blob` columns);
//! `google.protobuf.Timestamp` becomes RFC 3339 text.

use base64::Engine as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, MessageDescriptor, ReflectMessage, Value as PbValue};
use serde_json::{Map, Number, Value};

use super::{MappingError, SchemaError};
use crate::config::{Format, ProtobufConfig};

/// Decodes the payloads of one route.
#[derive(Debug, Clone)]
pub enum Decoder {
    /// One JSON object per message.
    Json,
    /// One Protobuf message of this type per message.
    Protobuf(MessageDescriptor),
    /// The payload is only reachable as `$payload`.
    Raw,
}

impl Decoder {
    /// Builds the decoder of a route's format; loads Protobuf descriptors (file IO).
    pub fn load(route: &str, format: &Format) -> Result<Decoder, SchemaError> {
        match format {
            Format::Json => Ok(Decoder::Json),
            Format::Text | Format::Bytes => Ok(Decoder::Raw),
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
            Decoder::Raw => Ok(Value::Null),
        }
    }
}

fn load_protobuf(config: &ProtobufConfig) -> Result<MessageDescriptor, String> {
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
