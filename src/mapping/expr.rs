//! Filters, conditions and computed columns in CEL (the Common Expression Language, as in
//! Kubernetes and Envoy) through the `cel` crate: compiled once per route at start-up,
//! evaluated per message on the core that maps it.
//!
//! Variables: `msg` (the decoded payload; `null` for a tombstone or a raw payload), `key` (the
//! message key as text, or `null`), `headers` (map of text headers), `source` (topic, stream,
//! queue, subject or endpoint), `partition` (Kafka partition or `null`), `position` (offset or
//! sequence), `timestamp` (message time in epoch milliseconds, or `null`). The standard
//! library plus the `strings` and `math` extensions are available.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::objects::{Key, Map};
use cel::{Context, Env, Program, Value as CelValue};
use serde_json::Value;

/// The environment every route compiles and runs in.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| {
    let mut env = Env::stdlib();
    // Both extensions only declare functions; a failure would be a bug in the crate.
    if let Err(error) = env.add_extension(cel::extensions::strings) {
        tracing::error!(?error, "CEL strings extension unavailable");
    }
    if let Err(error) = env.add_extension(cel::extensions::math) {
        tracing::error!(?error, "CEL math extension unavailable");
    }
    Arc::new(env)
});

/// One compiled expression and its source text (for error messages).
#[derive(Debug)]
pub struct Expr {
    source: String,
    program: Program,
}

/// What an expression sees of one message.
#[derive(Debug, Clone, Copy)]
pub struct Variables<'a> {
    /// Decoded payload.
    pub msg: &'a Value,
    /// Key as text.
    pub key: Option<&'a str>,
    /// Text headers.
    pub headers: &'a [(String, String)],
    /// Source name.
    pub source: &'a str,
    /// Kafka partition.
    pub partition: Option<i32>,
    /// Offset or sequence.
    pub position: i64,
    /// Message time, epoch milliseconds.
    pub timestamp_ms: Option<i64>,
}

/// A context with one message's variables bound; built once per message, only when the route
/// has expressions.
pub struct Bound {
    context: Context<'static, 'static>,
}

impl Bound {
    /// Binds `variables` (converting the payload to CEL values once).
    pub fn new(variables: &Variables<'_>) -> Bound {
        let mut context = Context::with_env(Arc::clone(&ENV));
        context.add_variable_from_value("msg", to_cel(variables.msg));
        let key = variables
            .key
            .map_or(CelValue::Null, |k| CelValue::String(Arc::new(k.to_string())));
        context.add_variable_from_value("key", key);
        let headers: HashMap<Key, CelValue> = variables
            .headers
            .iter()
            .map(|(name, value)| (Key::from(name.clone()), CelValue::String(Arc::new(value.clone()))))
            .collect();
        context.add_variable_from_value("headers", CelValue::Map(Map::from(headers)));
        context.add_variable_from_value("source", CelValue::String(Arc::new(variables.source.to_string())));
        let partition = variables
            .partition
            .map_or(CelValue::Null, |p| CelValue::Int(i64::from(p)));
        context.add_variable_from_value("partition", partition);
        context.add_variable_from_value("position", CelValue::Int(variables.position));
        let timestamp = variables.timestamp_ms.map_or(CelValue::Null, CelValue::Int);
        context.add_variable_from_value("timestamp", timestamp);
        Bound { context }
    }
}

impl Bound {
    /// Binds one row of a job as `row` (an object of its columns).
    pub fn row(row: &Value) -> Bound {
        let mut context = Context::with_env(Arc::clone(&ENV));
        context.add_variable_from_value("row", to_cel(row));
        Bound { context }
    }
}

impl Expr {
    /// Compiles `source`; the error is the parser's message.
    pub fn compile(source: &str) -> Result<Expr, String> {
        let program = ENV.compile(source).map_err(|e| e.to_string().replace('\n', " "))?;
        Ok(Expr {
            source: source.to_string(),
            program,
        })
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to a JSON value (then coerced to the column's type by the caller).
    pub fn evaluate(&self, bound: &Bound) -> Result<Value, String> {
        let value = self.program.execute(&bound.context).map_err(|e| e.to_string())?;
        value
            .json()
            .map_err(|e| format!("result cannot be a column value: {e:?}"))
    }

    /// Evaluates a condition; anything but a boolean is an error.
    pub fn is_true(&self, bound: &Bound) -> Result<bool, String> {
        match self.program.execute(&bound.context).map_err(|e| e.to_string())? {
            CelValue::Bool(b) => Ok(b),
            other => Err(format!("expected a boolean, got {other:?}")),
        }
    }
}

/// JSON → CEL, numbers as `int` when integral and in range, else `uint` or `double`.
fn to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                CelValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                CelValue::UInt(u)
            } else {
                CelValue::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Value::String(s) => CelValue::String(Arc::new(s.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(fields) => {
            let map: HashMap<Key, CelValue> = fields
                .iter()
                .map(|(name, value)| (Key::from(name.clone()), to_cel(value)))
                .collect();
            CelValue::Map(Map::from(map))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn bound(msg: &Value) -> Bound {
        let headers = vec![("tenant".to_string(), "acme".to_string())];
        Bound::new(&Variables {
            msg,
            key: Some("k-1"),
            headers: &headers,
            source: "orders",
            partition: Some(3),
            position: 42,
            timestamp_ms: Some(1_700_000_000_000),
        })
    }

    #[test]
    fn conditions_and_computed_values_see_every_variable() {
        let msg = json!({"qty": 3, "price": 2.5, "status": "paid", "customer": {"name": "Ada"}});
        let bound = bound(&msg);
        let eval = |source: &str| Expr::compile(source).unwrap().evaluate(&bound).unwrap();
        assert_eq!(eval("double(msg.qty) * msg.price"), json!(7.5));
        assert_eq!(eval("msg.customer.name + '@' + headers.tenant"), json!("Ada@acme"));
        assert_eq!(
            eval("key + ':' + source + ':' + string(partition) + ':' + string(position)"),
            json!("k-1:orders:3:42")
        );
        assert_eq!(eval("timestamp / 1000"), json!(1_700_000_000));
        assert_eq!(eval("msg.status.upperAscii()"), json!("PAID"));
        let is_true = |source: &str| Expr::compile(source).unwrap().is_true(&bound).unwrap();
        assert!(is_true("msg.status == 'paid' && has(msg.customer.name)"));
        assert!(!is_true("has(msg.refund)"));
    }

    #[test]
    fn errors_are_reported_not_panicked() {
        assert!(Expr::compile("msg.qty +").is_err());
        let msg = json!({"qty": 3});
        let bound = bound(&msg);
        assert!(Expr::compile("msg.missing + 1").unwrap().evaluate(&bound).is_err());
        assert!(Expr::compile("msg.qty").unwrap().is_true(&bound).is_err());
        assert!(Expr::compile("1 / 0").unwrap().evaluate(&bound).is_err());
    }
}
